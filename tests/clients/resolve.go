// Resolves a name with Go's own resolver (run with GODEBUG=netdns=go) and prints one address
// a line. Go's resolver reads /etc/resolv.conf itself and talks to the nameservers over
// connected UDP (and TCP for truncated answers). Exit 0 if the name resolved, 2 otherwise.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: resolve NAME")
		os.Exit(1)
	}
	resolver := &net.Resolver{PreferGo: true}
	addrs, err := resolver.LookupHost(context.Background(), os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for _, addr := range addrs {
		fmt.Println(addr)
	}
}
