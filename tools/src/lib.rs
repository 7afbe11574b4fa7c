//! dns-proxy's measuring tools, run as root through `cargo xtask bench|race|soak`: each builds
//! a topology of its own, puts the agent (and, for comparison, the classic iptables design)
//! under load there for a while, and reports what it measured; xtask builds the binaries they
//! run. They stand on the e2e tests' fixtures (the `tests` crate, named `fixtures` here:
//! namespaces, cgroups, servers, the agent process), so the tools and the tests share one copy
//! of them.
//!
//! The race is also an e2e test (tests/tests/e2e/race.rs): the harness must see the iptables
//! design lose lookups, and the agent must answer every one.
pub mod bench;
pub mod chaos;
pub mod race;
pub mod soak;
