//! `cargo xtask bench boot|run|net|fs|density`: boot-time, run-time and overhead figures (a benchmark, not a
//! test: it prints numbers and asserts nothing about them).
//!
//! `bench boot` ([`boot`]): host-side setup to the first `KVM_RUN`, then boot to the guest's
//! `/init` next to QEMU `-M microvm` and, when given, Firecracker and another microvm build.
//! `bench run` ([`run`]): `microvm run --rm IMG true` end to end next to crun and runc.
//! `bench density` ([`density`]): N idle VMs at once, time to all ready and host memory per VM,
//! next to N runc containers.

mod boot;
mod density;
mod fs;
mod net;
mod run;

use std::path::PathBuf;

use anyhow::Result;

use crate::util::workspace_root;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    what: What,
    /// Runs per VMM (`bench net`: seconds per iperf3 direction).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Internal: the part that runs where guests can boot.
    #[arg(long, hide = true)]
    inner: bool,
    /// `bench run`, `bench net`, `bench density`: use the debug build of microvm (quicker to
    /// build; slower host side).
    #[arg(long)]
    debug_build: bool,
    /// `bench density`: how many VMs (and runc containers) at once, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    counts: Vec<usize>,
    #[command(flatten)]
    boot: boot::BootArgs,
    #[command(flatten)]
    fs: fs::FsArgs,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum What {
    Boot,
    Run,
    Net,
    Fs,
    Density,
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    match args.what {
        What::Boot if args.inner => boot::boot_inner(args.runs, &args.boot),
        What::Boot => boot::boot(args.runs, &args.boot),
        What::Run if args.inner => run::run_inner(args.runs),
        What::Run => run::run_bench(args.runs, args.debug_build),
        What::Net if args.inner => net::net_inner(args.runs),
        What::Net => net::net_bench(args.runs, args.debug_build),
        What::Fs if args.inner => fs::fs_inner(args.runs, &args.fs),
        What::Fs => fs::fs_bench(args.runs, args.debug_build, &args.fs),
        What::Density if args.inner => density::density_inner(&args.counts),
        What::Density => density::density_bench(&args.counts, args.debug_build),
    }
}

/// Builds `microvm` and `microvm-vmm` (release unless `debug_build`); returns their directory.
fn build_microvm(debug_build: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(&cargo);
    build.args(["build", "-q", "-p", "microvm", "-p", "microvm-vmm"]);
    if !debug_build {
        build.arg("--release");
    }
    crate::util::run(build.current_dir(workspace_root()))?;
    let release = release_dir();
    Ok(if debug_build {
        release.with_file_name("debug")
    } else {
        release
    })
}

/// Runs `xtask bench ARGS... --inner` with `envs` where guests can boot: on this host, or inside
/// the testbed.
fn run_inner(args: &[&str], envs: &[(&str, std::ffi::OsString)]) -> Result<()> {
    let xtask = std::env::current_exe()?;
    let code = if vmm::host::check_can_boot_guests().is_ok() {
        let status = std::process::Command::new(&xtask)
            .arg("bench")
            .args(args)
            .arg("--inner")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .status()?;
        status.code().unwrap_or(1)
    } else {
        println!("== this host cannot boot guests; the benchmark runs inside the testbed ==");
        let mut argv = vec![xtask.into_os_string(), "bench".into()];
        argv.extend(args.iter().map(Into::into));
        argv.push("--inner".into());
        let mut tb = testbed::Testbed::new();
        for (k, v) in envs {
            tb = tb.env(*k, v);
        }
        tb.run(&argv, &workspace_root())
            .map_err(|e| anyhow::anyhow!("testbed: {e}"))?
    };
    if code != 0 {
        anyhow::bail!("the benchmark `{}` failed ({code})", args.join(" "));
    }
    Ok(())
}

/// Where cargo puts release binaries: `$CARGO_TARGET_DIR/release`, else the workspace's.
fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    s[s.len() / 2]
}

fn summary(v: &[f64], unit: &str) -> String {
    let s = sorted(v);
    format!(
        "median {:.1} {unit} (min {:.1}, max {:.1}, n={})",
        median(v),
        s[0],
        s[s.len() - 1],
        s.len()
    )
}

/// The number that follows `prefix` on `line`.
fn number_after(line: &str, prefix: &str) -> Option<f64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// (total RSS, RSS of the guest-memory mapping) in MiB, from /proc/PID/smaps: the guest RAM is
/// the mapping of exactly the guest's size.
fn rss_split(pid: u32, guest_bytes: u64) -> Result<(f64, f64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut total_kb, mut guest_kb, mut in_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_guest = b - a == guest_bytes;
                continue;
            }
        }
        if first == "Rss:" {
            let kb: u64 = words.next().unwrap_or("0").parse().unwrap_or(0);
            total_kb += kb;
            if in_guest {
                guest_kb += kb;
            }
        }
    }
    Ok((total_kb as f64 / 1024.0, guest_kb as f64 / 1024.0))
}
