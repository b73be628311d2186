//! `microvm`: run OCI containers in lightweight KVM virtual machines.
//!
//! `microvm run IMAGE [CMD...]` runs a container in its own microVM with docker's semantics;
//! `ps`, `exec`, `stop`, `kill`, `logs`, `rm` manage runs; `pull`, `images`, `rmi` the image
//! store; `boot` is the VMM's own front end.

mod boot;
mod commands;
mod images;
mod network;
mod run;
mod spec;
mod state;
mod term;
mod volumes;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "microvm",
    version,
    about = "Run containers in lightweight KVM virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command in a new container, in its own microVM
    Run(Box<run::RunArgs>),
    /// List runs
    Ps(commands::PsArgs),
    /// Run a command in a running run's container
    Exec(commands::ExecArgs),
    /// Stop runs: SIGTERM, then SIGKILL after a grace period
    Stop(commands::StopArgs),
    /// Send a signal to runs' containers
    Kill(commands::KillArgs),
    /// Print a detached run's output
    Logs(commands::LogsArgs),
    /// Remove runs
    Rm(commands::RmArgs),
    /// Fetch an image into the local store
    Pull(commands::PullCmd),
    /// List the stored images
    Images,
    /// Remove images from the store
    Rmi(commands::RmiArgs),
    /// Boot a Linux kernel in a microVM; the serial console goes to stdout. Exits 0 when the
    /// guest resets the VM (`reboot` with `reboot=k`), non-zero on a VM error.
    Boot(boot::BootArgs),
    /// Internal: owns a detached run's VM.
    #[command(name = "__monitor", hide = true)]
    Monitor { dir: PathBuf },
}

/// An error that ends `microvm` with a given status (docker's: 125 for our own failures,
/// 126/127 for a command that cannot be run).
#[derive(Debug)]
pub struct ExitError {
    pub code: u8,
    pub message: String,
}

impl ExitError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}

fn main() -> ExitCode {
    vmm::timing::mark_process_start();
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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Usage errors of `run` and `exec` are microvm's own: 125, like docker; elsewhere
            // clap's 2.
            let is_run = std::env::args()
                .nth(1)
                .is_some_and(|a| a == "run" || a == "exec");
            let code = e.exit_code();
            let _ = e.print();
            return ExitCode::from(if is_run && code != 0 { 125 } else { code as u8 });
        }
    };
    let (result, own_error) = match cli.cmd {
        Cmd::Boot(args) => (boot::boot(args), 1),
        Cmd::Run(args) => (run::run(*args), 125),
        Cmd::Monitor { dir } => (run::monitor(dir), 125),
        Cmd::Exec(args) => (commands::exec(args), 125),
        Cmd::Ps(args) => (commands::ps(args), 1),
        Cmd::Stop(args) => (commands::stop(args), 1),
        Cmd::Kill(args) => (commands::kill(args), 1),
        Cmd::Logs(args) => (commands::logs(args), 1),
        Cmd::Rm(args) => (commands::rm(args), 1),
        Cmd::Pull(args) => (commands::pull(args), 1),
        Cmd::Images => (commands::images(), 1),
        Cmd::Rmi(args) => (commands::rmi(args), 1),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => match e.downcast_ref::<ExitError>() {
            Some(x) => {
                if !x.message.is_empty() {
                    eprintln!("microvm: {}", x.message);
                }
                ExitCode::from(x.code)
            }
            None => {
                eprintln!("microvm: {e:#}");
                ExitCode::from(own_error)
            }
        },
    }
}
