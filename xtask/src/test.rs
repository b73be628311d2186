//! `cargo xtask test`: everything CI checks, in one command.
//!
//! 1. Debian packages the tests use (e2fsprogs for disk images, busybox for guest userspace).
//! 2. The guest kernel and virtiofsd (cached outside the checkout).
//! 3. Formatting and clippy with warnings as errors.
//! 4. `cargo test --workspace`: unit tests here, guest-booting tests inside the testbed when
//!    this host's KVM cannot boot guests (the test binary relays itself).
//! 5. Every fuzz target for a few seconds on its committed corpus (`cargo xtask fuzz`).

use std::process::Command;

use anyhow::Result;

use crate::kernel::{self, KernelArgs};
use crate::util::{ensure_debs, run, workspace_root};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Packages the guest tests need on the host (or, through the shared root, in the testbed).
/// What the tests run for real: e2fsprogs (disks), busybox (test images), Debian's registry
/// and skopeo (`microvm run` from a registry), containerd (the shim), `script` (ttys);
/// libssl-dev and pkg-config build oci-client's TLS; libseccomp-dev and libcap-ng-dev build
/// virtiofsd (volumes); the CNI plugins (the shim's CRI tests too); procps' `pgrep` (critest's
/// image: busybox-static has none).
pub const TEST_DEBS: &[&str] = &[
    "e2fsprogs",
    "busybox-static",
    "procps",
    "cpio",
    "docker-registry",
    "skopeo",
    "containerd",
    "bsdutils",
    "containernetworking-plugins",
    "iptables",
    "libssl-dev",
    "pkg-config",
    "libseccomp-dev",
    "libcap-ng-dev",
];

pub fn run_tests(args: &TestArgs) -> Result<()> {
    ensure_debs(TEST_DEBS)?;
    testbed::ensure_prerequisites()?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let virtiofsd = crate::virtiofsd::build()?;
    // crictl, critest, containerd 2.x for the shim's CRI tests (from the cache after once).
    for peer in crate::peers::ALL {
        crate::peers::build(peer)?;
    }
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !args.no_lint {
        step("cargo fmt --check");
        run(Command::new(&cargo)
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(&root))?;
        step("cargo clippy");
        run(Command::new(&cargo)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(&root))?;
    }
    step("cargo build");
    run(Command::new(&cargo)
        .args(["build", "--workspace", "--bins"])
        .current_dir(&root))?;
    step("the static guest agent");
    let agent = crate::agent::build()?;
    step("cargo test");
    run(Command::new(&cargo)
        .args(["test", "--workspace"])
        .args(&args.cargo_args)
        .env("MICROVM_KERNEL", &vmlinux)
        .env("MICROVM_AGENT", &agent)
        .env("MICROVM_VIRTIOFSD", &virtiofsd)
        .current_dir(&root))?;
    step("fuzz targets");
    crate::fuzz::run_targets(&[], crate::fuzz::TEST_SECONDS, None)?;
    Ok(())
}

fn step(name: &str) {
    eprintln!("xtask test: {name}");
}
