//! `microvm-vmm`: one VM per process. It reads a [`vmm_api::VmConfig`] (JSON, at most
//! [`vmm_api::MAX_CONFIG_BYTES`]) from an inherited descriptor (`--config-fd N`: a pipe or a
//! sealed memfd, what the sandbox passes) or a file (`--config PATH`, for people), boots the VM
//! and serves it until the guest resets.
//!
//! The guest's serial console goes to stdout, the VMM's log to stderr. Exit status: 0 when the
//! guest reset the VM, 1 on any failure (with one line on stderr), 2 for a usage error.
//!
//! With the config's `jail`, the process confines itself with the `jail` crate before the guest
//! runs: the process its starter knows becomes the jail's supervisor (unprivileged, it waits and
//! ends as the VMM ended), the VM runs in its child, PID 1 of a namespace of its own.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use jail::{Forked, Jail};
use tracing_subscriber::EnvFilter;
use vmm_api::{JailConfig, VmConfig};

const USAGE: &str = "usage: microvm-vmm --config-fd N | --config PATH";

/// Where the config comes from.
#[derive(Debug, PartialEq, Eq)]
enum ConfigSource {
    /// A descriptor this process inherited, read to its end.
    Fd(RawFd),
    /// A file.
    Path(PathBuf),
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    Boot(ConfigSource),
    Help,
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Invocation, String> {
    let first = args.next().ok_or(USAGE)?;
    let (flag, inline) = match first.to_str().and_then(|s| s.split_once('=')) {
        Some((flag, value)) => (flag.to_string(), Some(OsString::from(value))),
        None => (first.to_string_lossy().into_owned(), None),
    };
    if flag == "-h" || flag == "--help" {
        return Ok(Invocation::Help);
    }
    let value = match inline.or_else(|| args.next()) {
        Some(v) => v,
        None => return Err(format!("{flag} needs a value; {USAGE}")),
    };
    if let Some(extra) = args.next() {
        return Err(format!("unexpected argument {extra:?}; {USAGE}"));
    }
    let source = match flag.as_str() {
        "--config-fd" => {
            let fd: RawFd = value
                .to_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("--config-fd takes a descriptor number, not {value:?}"))?;
            if fd < 3 {
                return Err(format!(
                    "--config-fd must be 3 or more (0 to 2 are stdio), not {fd}"
                ));
            }
            ConfigSource::Fd(fd)
        }
        "--config" => ConfigSource::Path(value.into()),
        _ => return Err(format!("unknown argument {first:?}; {USAGE}")),
    };
    Ok(Invocation::Boot(source))
}

/// Reads, size-capped, and validates the config.
fn read_config(source: ConfigSource) -> Result<VmConfig> {
    match source {
        ConfigSource::Fd(fd) => {
            // Adopting a descriptor that is not open would close a number some later open
            // reuses; /proc says whether it is open without touching it.
            if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
                bail!("config descriptor {fd} is not open");
            }
            // SAFETY: the descriptor is open (checked above), was handed to this process for
            // exactly this use, and nothing in it has opened or adopted a descriptor yet (this
            // runs before any other setup), so this `File` is its only owner; it is closed once
            // read.
            let file = unsafe { File::from_raw_fd(fd) };
            VmConfig::from_reader(file).with_context(|| format!("config from descriptor {fd}"))
        }
        ConfigSource::Path(path) => {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            VmConfig::from_reader(file).with_context(|| format!("config {}", path.display()))
        }
    }
}

fn run(source: ConfigSource) -> Result<i32> {
    let config = read_config(source)?;
    init_logging();
    let Some(jail) = config
        .jail
        .as_ref()
        .map(|j| jail_for(j, &config))
        .transpose()?
    else {
        return Ok(vmm::run(config, Box::new(std::io::stdout()))?);
    };
    // Still one thread here, as the fork needs.
    match jail.fork_into_pid_namespace()? {
        Forked::Supervisor(supervisor) => supervisor.wait()?.relay(),
        Forked::Pid1(parent) => {
            jail.isolate()?;
            let confine = || Ok(jail.confine(&parent)?);
            Ok(vmm::run_confined(
                config,
                Box::new(std::io::stdout()),
                confine,
            )?)
        }
    }
}

/// The jail `config` asks for: its ids and cgroup; a network namespace of its own unless it
/// has taps (they are opened in the namespace the VMM was started in); its vsock socket's
/// directory the one thing visible in its root, for the connections the guest opens to host
/// listeners `<socket>_<port>` beside it. Everything else is opened before the root changes.
fn jail_for(j: &JailConfig, config: &VmConfig) -> Result<Jail> {
    let mut jail = Jail::new(j.uid, j.gid)?;
    jail.cgroup = j.cgroup.clone();
    jail.new_network_namespace = config.nets.is_empty();
    jail.visible_dirs = config
        .vsock
        .iter()
        .filter_map(|v| v.uds_path.parent().map(Path::to_path_buf))
        .collect();
    Ok(jail)
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,boot_marker=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

fn main() -> ExitCode {
    vmm::timing::mark_process_start();
    let source = match parse_args(std::env::args_os().skip(1)) {
        Ok(Invocation::Boot(source)) => source,
        Ok(Invocation::Help) => {
            println!("{USAGE}\nBoots one VM from a JSON vmm_api::VmConfig; see vmm/README.md.");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("microvm-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    match run(source) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("microvm-vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn the_two_ways_to_name_a_config() {
        assert_eq!(
            parse(&["--config-fd", "3"]),
            Ok(Invocation::Boot(ConfigSource::Fd(3)))
        );
        assert_eq!(
            parse(&["--config-fd=7"]),
            Ok(Invocation::Boot(ConfigSource::Fd(7)))
        );
        assert_eq!(
            parse(&["--config", "/etc/vm.json"]),
            Ok(Invocation::Boot(ConfigSource::Path("/etc/vm.json".into())))
        );
        assert_eq!(parse(&["--help"]), Ok(Invocation::Help));
    }

    #[test]
    fn anything_else_is_a_usage_error() {
        for (args, says) in [
            (&[][..], "usage"),
            (&["--config-fd"][..], "needs a value"),
            (&["--config-fd", "1"][..], "3 or more"),
            (&["--config-fd", "x"][..], "descriptor number"),
            (&["--config", "/a", "/b"][..], "unexpected argument"),
            (&["--kernel", "/k"][..], "unknown argument"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }
}
