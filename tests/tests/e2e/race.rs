//! The conntrack race, as `cargo xtask race` shows it, with a narrowed ephemeral port range so
//! that the outcome is not left to chance.
use std::path::Path;

use dns_proxy_tools::race::{self, Mode, Settings, Tools};

use super::*;

/// 50 ephemeral ports: a fresh socket of the classic forwarder soon gets a port whose
/// redirected flow conntrack still remembers.
const NARROW: Option<(u16, u16)> = Some((40_000, 40_049));

fn tools() -> Tools<'static> {
    Tools {
        classic_forwarder: Path::new(env!("CARGO_BIN_EXE_classic-forwarder")),
        lookup_load: Path::new(env!("CARGO_BIN_EXE_lookup-load")),
    }
}

#[test]
fn the_harness_sees_the_iptables_design_lose_lookups_to_loops() {
    let settings = Settings {
        lookups: 300,
        port_range: NARROW,
        timeout: Duration::from_millis(300),
    };
    let outcome = race::run(Mode::Iptables, &settings, &tools());
    let table = race::table(std::slice::from_ref(&outcome));
    assert!(outcome.failed > 0, "the race did not show:\n{table}");
    assert!(outcome.looped > 0, "no looped query seen:\n{table}");
    assert!(outcome.conntrack_entries > 0, "{table}");
}

#[test]
fn the_agent_answers_every_one_of_2000_lookups() {
    let settings = Settings {
        lookups: 2000,
        port_range: NARROW,
        // A lost lookup is never answered: 3 s only spares a loaded machine's delays.
        timeout: Duration::from_millis(3000),
    };
    let outcome = race::run(Mode::Agent, &settings, &tools());
    let table = race::table(std::slice::from_ref(&outcome));
    assert_eq!((outcome.lookups, outcome.answered), (2000, 2000), "{table}");
    assert_eq!(outcome.looped, 0, "{table}");
    assert_eq!(
        outcome.conntrack_entries, 0,
        "no NAT state at all:\n{table}"
    );
}
