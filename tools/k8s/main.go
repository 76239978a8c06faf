// Command k8s is a multi-call binary holding upstream Kubernetes' kube-apiserver,
// kube-controller-manager, kube-scheduler and kubectl, built from the published Go modules (see
// go.mod), so the tests' kubectl comes from the same release as the control plane.
//
// The role is taken from the basename of argv[0] (when invoked through a symlink named after a
// role, as tools/cluster's `kubectl` link is) or else from argv[1]:
//
//	k8s kube-apiserver --etcd-servers=... ...
//	k8s kube-controller-manager --kubeconfig=... ...
//	k8s kube-scheduler --kubeconfig=... ...
//	k8s kubectl get pods            (or: kubectl get pods, through the symlink)
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

	_ "k8s.io/client-go/plugin/pkg/client/auth" // client auth plugins, as upstream cmd/kubectl
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream mains do
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// Each role runs with its arguments (argv without the binary and role names) and returns the exit
// code.
var roles = map[string]func(args []string) int{
	"kube-apiserver": func(args []string) int {
		cmd := apiserver.NewAPIServerCommand()
		cmd.SetArgs(args)
		return cli.Run(cmd)
	},
	"kube-controller-manager": func(args []string) int {
		cmd := controllermanager.NewControllerManagerCommand()
		cmd.SetArgs(args)
		return cli.Run(cmd)
	},
	"kube-scheduler": func(args []string) int {
		cmd := scheduler.NewSchedulerCommand()
		cmd.SetArgs(args)
		return cli.Run(cmd)
	},
	"kubectl": runKubectl,
}

// runKubectl is upstream cmd/kubectl's main (k8s.io/kubernetes/cmd/kubectl/kubectl.go). Its
// cmd.NewDefaultKubectlCommand reads os.Args (plugin lookup) and cobra falls back to it, so os.Args
// is first set to what a standalone kubectl would see: "kubectl" and kubectl's own arguments.
func runKubectl(args []string) int {
	os.Args = append([]string{"kubectl"}, args...)
	command := kubectl.NewDefaultKubectlCommand()
	command.SetArgs(args)
	if err := cli.RunNoErrOutput(command); err != nil {
		// Pretty-print the error and exit with an error, as upstream does.
		kubectlutil.CheckErr(err)
	}
	return 0
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s ROLE [flags...]\nroles: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl\n", filepath.Base(os.Args[0]))
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
	run, ok := roles[role]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
		usage()
	}
	os.Exit(run(args))
}
