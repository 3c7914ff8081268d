// Command coredns is upstream CoreDNS with only the plugins meshlink's end-to-end tests use, so
// that its module graph stays small (no cloud-provider, etcd or tracing plugins) and it builds in
// a few minutes. e2e/src/coredns.rs writes the Corefile that uses them; build.sh builds it.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// Each plugin registers itself with CoreDNS when its package is loaded.
	_ "github.com/coredns/coredns/plugin/bind"       // listen on the test host's address only, never on every interface
	_ "github.com/coredns/coredns/plugin/errors"     // errors (an API server that refuses a watch) go to the log
	_ "github.com/coredns/coredns/plugin/kubernetes" // <svc>.<ns>.svc.cluster.local from the cluster's API server
	_ "github.com/coredns/coredns/plugin/log"        // one line per query: what a failing test's log shows
	_ "github.com/coredns/coredns/plugin/ready"      // /ready answers 200 once the kubernetes plugin has synced
	_ "github.com/coredns/coredns/plugin/template"   // NXDOMAIN for every name outside the cluster: nothing is forwarded
)

// directives lists the plugins above in the order upstream's plugin.cfg gives them, which is the
// order a query passes through them. A Corefile may use only these.
var directives = []string{
	"bind",
	"ready",
	"errors",
	"log",
	"template",
	"kubernetes",
}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
