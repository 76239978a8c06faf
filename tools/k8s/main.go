// Command k8s is a multi-call binary holding upstream Kubernetes' kube-apiserver,
// kube-controller-manager and kube-scheduler, built from the published Go modules (see go.mod).
//
// The role is taken from the basename of argv[0] (when invoked through a symlink named after a
// role) or else from argv[1]:
//
//	k8s kube-apiserver --etcd-servers=... ...
//	k8s kube-controller-manager --kubeconfig=... ...
//	k8s kube-scheduler --kubeconfig=... ...
//
// Each role is meant to run as its own process (as upstream does): running several in one process
// would share global feature gates, klog flags and Prometheus registries.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	_ "time/tzdata" // CronJob time zones, as in upstream cmd/kube-apiserver and cmd/kube-controller-manager

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream mains do
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var roles = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s ROLE [flags...]\nroles: kube-apiserver, kube-controller-manager, kube-scheduler\n", filepath.Base(os.Args[0]))
	os.Exit(2)
}

func main() {
	role, args := filepath.Base(os.Args[0]), os.Args[1:]
	if _, ok := roles[role]; !ok {
		if len(os.Args) < 2 || strings.HasPrefix(os.Args[1], "-") {
			usage()
		}
		role, args = os.Args[1], os.Args[2:]
	}
	newCmd, ok := roles[role]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
		usage()
	}
	cmd := newCmd()
	cmd.SetArgs(args)
	os.Exit(cli.Run(cmd))
}
