//! Project automation: `cargo xtask <command>`.
//!
//! - `agent`: build the static guest agent.
//! - `kernel`: build (or find in the cache) the guest `vmlinux`.
//! - `virtiofsd`: build (or find in the cache) the virtio-fs daemon.
//! - `peers`: build (or find in the cache) crictl, critest and containerd 2.x from Go modules.
//! - `testbed -- CMD...`: run CMD as root inside an emulated nested-KVM host.
//! - `test`: everything CI runs.
//! - `demo`: the README's main command.
//! - `install [--prefix DIR] [--destdir DIR] ...`: build and install on a node (binaries,
//!   guest kernel and agent, the shim's config, a containerd drop-in, a RuntimeClass).
//! - `fuzz [--seconds N] [TARGET...]`: run the cargo-fuzz targets in `fuzz/`.
//! - `bench boot`: boot-time and overhead figures; `bench run`: `microvm run` end to end.

mod agent;
mod bench;
mod demo;
mod fuzz;
mod install;
mod kernel;
mod peers;
mod test;
mod testbed;
mod util;
mod virtiofsd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "microvm project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the static guest agent and print its path.
    Agent,
    /// Build the guest kernel (cached outside the checkout) and print the path of its vmlinux.
    Kernel(kernel::KernelArgs),
    /// Build the virtio-fs daemon (cached outside the checkout) and print its path.
    Virtiofsd,
    /// Build crictl, critest and containerd 2.x from the Go module proxy (cached outside the
    /// checkout by version) and print their paths.
    Peers,
    /// Run a command as root inside the emulated nested-KVM host (QEMU TCG with AMD SVM).
    Testbed(testbed::TestbedArgs),
    /// Run everything CI runs: lints, unit tests, guest-booting tests (in the testbed if needed).
    Test(test::TestArgs),
    /// Print benchmark figures (`boot`: setup time, boot to init vs QEMU microvm, RSS; `run`:
    /// `microvm run IMG true` cold and warm with its phases, next to crun and runc).
    Bench(bench::BenchArgs),
    /// Build everything and boot a microVM that greets (through the testbed where needed).
    Demo,
    /// Build (release) and install microvm on a node: the binaries, the guest kernel and
    /// agent, the shim's config naming them, a containerd drop-in for the `microvm` runtime
    /// handler and a Kubernetes RuntimeClass (default prefix /usr/local, configs in /etc).
    Install(install::InstallArgs),
    /// Run the fuzz targets in `fuzz/` (cargo-fuzz), each for a while; print execs and crashes.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Kernel(args) => {
            let path = kernel::build(&args)?;
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Virtiofsd => {
            println!("{}", virtiofsd::build()?.display());
            Ok(())
        }
        Cmd::Peers => peers::peers(),
        Cmd::Agent => {
            println!("{}", agent::build()?.display());
            Ok(())
        }
        Cmd::Testbed(args) => {
            let code = testbed::run(&args)?;
            std::process::exit(code);
        }
        Cmd::Test(args) => test::run_tests(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Demo => demo::demo(),
        Cmd::Install(args) => install::install(&args),
        Cmd::Fuzz(args) => fuzz::fuzz(&args),
    }
}
