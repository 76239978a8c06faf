// Command kube-proxy is upstream Kubernetes' kube-proxy (k8s.io/kubernetes/cmd/kube-proxy), built
// from the published Go modules of the same release as tools/k8s's control plane (see go.mod). Built
// by `tools/cluster kube-proxy`; never commit the binary. It is its own module so that building it
// never changes tools/k8s (whose hash keys the control-plane binary).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream's main
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	"k8s.io/kubernetes/cmd/kube-proxy/app"
)

// main is upstream cmd/kube-proxy/proxy.go's main.
func main() {
	command := app.NewProxyCommand()
	code := cli.Run(command)
	os.Exit(code)
}
