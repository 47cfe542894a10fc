// Command pause is the pod sandbox's first process: it holds the pod's namespaces
// open, reaps zombies (it is PID 1 when the pod shares its PID namespace) and
// exits on SIGINT/SIGTERM. Built locally because this machine pulls no images.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			// Reap every exited child so none stays a zombie.
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
