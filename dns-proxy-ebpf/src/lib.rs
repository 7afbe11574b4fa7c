#![no_std]
//! The eBPF programs are the `dns-proxy` binary target of this crate (src/main.rs), built for
//! the bpf target by dns-proxy's build script. This empty library lets dns-proxy name the crate
//! as a build dependency, so cargo rebuilds the programs when they change.
