use std::{io::Write as _, os::unix::process::ExitStatusExt as _, process::ExitCode};

use clap::{CommandFactory as _, Parser as _};
use dns_proxy::{
    Outcome, RunError,
    config::{Cli, Command, RunConfig},
};

/// `exec`'s own failures, as `env` and container runtimes report them: apart from any status
/// the command itself may exit with.
const EXEC_FAILED: u8 = 125;
const EXEC_NOT_EXECUTABLE: u8 = 126;
const EXEC_NOT_FOUND: u8 = 127;

/// A usage error of `run` (a flag that does not parse), as clap and most tools report it.
const USAGE_ERROR: u8 = 2;

/// Makes an empty or blank `DNS_PROXY_*` variable (`DNS_PROXY_EXCLUDE_CGROUPS=` left in
/// /etc/default/dns-proxy, or a space left in a pod spec's `value: " "`) mean what an absent
/// one does, the flag's default, as systemd's `EnvironmentFile=` users expect, rather than a
/// value that does not parse: under `Restart=always` that was a restart loop.
fn drop_empty_settings() {
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(name, value)| {
            is_blank(value.as_encoded_bytes())
                && name
                    .to_str()
                    .is_some_and(|name| name.starts_with("DNS_PROXY_"))
        })
        .map(|(name, _)| name)
        .collect();
    for name in empty {
        // SAFETY: first thing in main, before any thread is started: nothing else reads or
        // writes the environment meanwhile.
        unsafe { std::env::remove_var(name) };
    }
}

/// The variables that hold lists, comma-separated.
const LIST_SETTINGS: [&str; 2] = ["DNS_PROXY_EXCLUDE_CGROUPS", "DNS_PROXY_EXCLUDE_SERVERS"];

/// Trims each item of a list variable and drops empty ones: `a , b`, `a,` and a value that
/// ends in a newline (a YAML block scalar's) are `a,b`, `a` and the value without it, as a
/// person writing /etc/default/dns-proxy or a pod spec means, not a usage error (a restart
/// loop under `Restart=always`; helper-139) nor a cgroup that never exists, left redirected
/// (helper-141). A path with white space at either end is named with the flag. A list left
/// with no item is dropped as a blank one.
fn tidy_list_settings() {
    for name in LIST_SETTINGS {
        let Some(value) = std::env::var_os(name) else {
            continue;
        };
        let Some(value) = value.to_str() else {
            continue;
        };
        let items: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .collect();
        // SAFETY: first thing in main, before any thread is started: nothing else reads or
        // writes the environment meanwhile.
        unsafe { std::env::set_var(name, items.join(",")) };
    }
}

/// Empty, only white space (`\v` included, which `trim_ascii` keeps), or an empty pair of
/// quotes, which Docker's `--env-file` passes on as they are (`DNS_PROXY_CACHE_SIZE=""`).
fn is_blank(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    matches!(value, b"\"\"" | b"''") || value.iter().all(|b| b.is_ascii_whitespace() || *b == 0x0b)
}

/// The variables that set nothing though they look like settings: a `DNS_PROXY_*` name that no
/// flag reads (`DNS_PROXY_METRIC` for `DNS_PROXY_METRICS`), which would leave its setting at
/// the default without a word (helper-179: metrics off); each with the setting it is one or
/// two letters off, for those that are. The settings are those of `subcommand` (`exec` reads
/// fewer than `run`). At most [`MAX_UNKNOWN_SAID`] names are looked at.
fn unknown_settings(subcommand: &str) -> Vec<(String, String)> {
    let command = Cli::command();
    let mut known: std::collections::HashSet<String> = std::iter::once(&command)
        .chain(
            command
                .get_subcommands()
                .filter(|command| command.get_name() == subcommand),
        )
        .flat_map(clap::Command::get_arguments)
        .filter_map(clap::Arg::get_env)
        .filter_map(|name| name.to_str().map(str::to_owned))
        .collect();
    known.extend(
        dns_proxy::TEST_SETTINGS
            .iter()
            .map(|name| (*name).to_owned()),
    );
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("DNS_PROXY_") && !known.contains(name))
        .collect();
    names.sort();
    names.truncate(MAX_UNKNOWN_SAID);
    names
        .into_iter()
        .filter_map(|name| near_miss(&name, &known).map(|meant| (name, meant)))
        .collect()
}

/// The setting `name` is one or two letters off (inserted, removed or replaced), the nearest
/// if several are.
fn near_miss(name: &str, settings: &std::collections::HashSet<String>) -> Option<String> {
    settings
        .iter()
        .map(|setting| (strsim::levenshtein(name, setting), setting))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, setting)| setting.clone())
}

/// The most unknown `DNS_PROXY_*` variables named one by one: each is compared with every
/// setting, and 20,000 of them took 10 s to start (helper-180).
const MAX_UNKNOWN_SAID: usize = 32;

fn main() -> ExitCode {
    tidy_list_settings();
    drop_empty_settings();
    let journal = dns_proxy::journal::stderr_is_the_journal();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            if journal && err.use_stderr() {
                // Each line an error to the journal (a bad DNS_PROXY_* value in the unit's
                // environment file is the usual one), not info.
                let message = err.render().to_string();
                let _ = dns_proxy::journal::write_lines(&mut std::io::stderr(), 3, &message);
            } else {
                let _ = err.print();
            }
            // --help and --version are not errors; a usage error of `exec` is one of exec's
            // own failures.
            let exec = std::env::args_os().nth(1).is_some_and(|arg| arg == "exec");
            return ExitCode::from(match (err.use_stderr(), exec) {
                (false, _) => 0,
                (true, true) => EXEC_FAILED,
                (true, false) => USAGE_ERROR,
            });
        }
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if journal {
        logger.format(dns_proxy::journal::write_line);
    }
    logger.init();
    // Only a near miss, which is surely meant as a setting: other names may be another
    // tool's (the tests' DNS_PROXY_BIN), and a line for each would come before every error.
    let subcommand = match cli.command {
        Command::Run(_) => "run",
        Command::Exec(_) => "exec",
    };
    for (name, meant) in unknown_settings(subcommand) {
        log::warn!("{name} sets nothing: did you mean {meant}?");
    }
    let (config, is_exec) = match cli.command {
        Command::Run(args) => (RunConfig::try_from(args), false),
        Command::Exec(args) => (RunConfig::try_from(args), true),
    };
    let result = config
        .map_err(|err| (err.to_string(), None))
        .and_then(|config| dns_proxy::run(config).map_err(|err| (err.to_string(), Some(err))));
    match result {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::CommandExited(status)) => exit_code_of(status),
        // Logged as it happened; a service manager starts it anew.
        Ok(Outcome::Stranded) => ExitCode::FAILURE,
        // One line that says what failed and what to do; the error types carry the detail.
        Err((message, err)) => {
            // Not eprintln!: with stderr closed it would panic, and the exit code with it.
            let message = format!("dns-proxy: error: {message}");
            let _ = if journal {
                // Every line an error: a verifier's refusal carries the kernel's whole log.
                dns_proxy::journal::write_lines(&mut std::io::stderr(), 3, &message)
            } else {
                writeln!(std::io::stderr(), "{message}")
            };
            match err {
                Some(RunError::Spawn { source, .. }) if is_exec => {
                    if source.kind() == std::io::ErrorKind::NotFound {
                        ExitCode::from(EXEC_NOT_FOUND)
                    } else {
                        ExitCode::from(EXEC_NOT_EXECUTABLE)
                    }
                }
                _ if is_exec => ExitCode::from(EXEC_FAILED),
                // Flags that parse but do not fit (a wildcard --listen, --upstream the proxy
                // itself): a usage error too, which no restart mends (the unit's
                // RestartPreventExitStatus=2).
                None => ExitCode::from(USAGE_ERROR),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The command's exit status, as a shell would report it (128 + N for signal N).
fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        (None, None) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_one_or_two_letters_off_is_told_apart_from_anothers_variable() {
        let settings: std::collections::HashSet<String> =
            ["DNS_PROXY_METRICS", "DNS_PROXY_LISTEN", "DNS_PROXY_LISTEN6"]
                .map(str::to_owned)
                .into();
        let meant = |name| near_miss(name, &settings);
        assert_eq!(
            meant("DNS_PROXY_METRIC").as_deref(),
            Some("DNS_PROXY_METRICS")
        );
        assert_eq!(
            meant("DNS_PROXY_LISTNE").as_deref(),
            Some("DNS_PROXY_LISTEN")
        );
        // The nearest of two: LISTEN is one off, LISTEN6 two.
        assert_eq!(
            meant("DNS_PROXY_LISTE").as_deref(),
            Some("DNS_PROXY_LISTEN")
        );
        // Another tool's variable, not a setting mistyped.
        assert_eq!(meant("DNS_PROXY_BIN"), None);
    }
}
