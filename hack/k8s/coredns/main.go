// A CoreDNS with only the plugins the local cluster's DNS uses, built from the pinned module (the way
// CoreDNS documents custom builds: set dnsserver.Directives, import the plugins, call coremain.Run).
// hack/build-binaries.sh builds it; hack/real-node.sh runs it. The order below is plugin.cfg's order,
// which is the order CoreDNS runs plugins in.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

var directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes", "forward"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
