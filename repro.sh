#!/bin/bash
cd /work/adv/helper-119
py='import socket,sys
for fam,n in ((socket.AF_UNSPEC,"big.example"),(socket.AF_INET6,"nodata.example")):
  try: print(n, len(socket.getaddrinfo(n,None,fam)), "addresses")
  except Exception as e: print(n, "ERR", e)'
for i in 1 2; do
  RESOLV=resolv/sa ./w.sh venv/bin/python -c "$py"
  RESOLV=resolv/sa GODEBUG=netdns=go ./w.sh cl/gores ip6 nodata.example
done
