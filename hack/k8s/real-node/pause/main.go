// pause: the pod sandbox process of the real node (no registry is reachable, so no
// registry.k8s.io/pause). It holds the pod's namespaces, reaps zombies (it is PID 1 when the pod
// shares its PID namespace) and exits 0 on SIGINT/SIGTERM, like the upstream C pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
