#!/bin/bash
# agent.sh NAME args...
name=$1; shift
RUST_LOG=info,dns_proxy=debug nsenter --net=/run/netns/adv120-c -- /work/adv/bin7/dns-proxy run --cgroup /sys/fs/cgroup/unified/adv-helper-120/work --state-dir /run/adv120/bpf/$name "$@" > /work/adv/helper-120/logs/$name.out 2> /work/adv/helper-120/logs/$name.log &
echo $! > /work/adv/helper-120/pids/$name
