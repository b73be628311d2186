//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the cargo-fuzz targets in `fuzz/` and
//! runs each for N seconds on its corpus, then prints per target the executions, the rate and
//! the crashes, and a closing `fuzz: N passed, M failed` line. `cargo xtask test` runs every
//! target briefly the same way.
//!
//! The committed seeds in `fuzz/corpus/<target>/` are read, never written; what a run finds
//! goes to `fuzz/corpus-grown/<target>/` (ignored by git), crashes to `fuzz/artifacts/<target>/`.
//! `cargo-fuzz` is installed from crates.io into the cache, once per version. Its sanitizer
//! flags need a nightly compiler: the `nightly` toolchain when rustup has one, else the
//! default toolchain with `RUSTC_BOOTSTRAP=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, run, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target for `cargo xtask test`.
pub const TEST_SECONDS: u64 = 20;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs (at most, with --runs).
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Stop each target after this many executions (libFuzzer's -runs), for a campaign of a
    /// fixed size such as 10 M.
    #[arg(long)]
    runs: Option<u64>,
    /// Targets to run (default: all of `fuzz/Cargo.toml`'s).
    targets: Vec<String>,
}

/// What one target's run did.
struct Outcome {
    target: String,
    execs: u64,
    execs_per_s: u64,
    crashes: u64,
    artifact: Option<String>,
}

pub fn fuzz(args: &FuzzArgs) -> Result<()> {
    run_targets(&args.targets, args.seconds, args.runs)
}

/// Builds and runs `targets` (all when empty) for `seconds` each (or `runs` executions, if that
/// comes first); fails if any crashed.
pub fn run_targets(targets: &[String], seconds: u64, runs: Option<u64>) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let all = list_targets(&fuzz_dir)?;
    let targets: Vec<String> = if targets.is_empty() {
        all
    } else {
        for t in targets {
            if !all.contains(t) {
                bail!("no fuzz target {t}; there are: {}", all.join(", "));
            }
        }
        targets.to_vec()
    };
    let cargo_fuzz = ensure_cargo_fuzz()?;
    // All targets in one build (they share every dependency); cargo-fuzz takes one or all.
    eprintln!("xtask fuzz: building the fuzz targets");
    let mut build = Command::new(&cargo_fuzz);
    build.args(["fuzz", "build"]);
    run(with_nightly(&mut build).current_dir(&root))?;
    let bin_dir = fuzz_dir.join("target/x86_64-unknown-linux-gnu/release");
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_target(&fuzz_dir, &bin_dir.join(target), target, seconds, runs)?;
        println!(
            "fuzz: {}: {} execs, {} execs/s, {} crashes{}",
            outcome.target,
            outcome.execs,
            outcome.execs_per_s,
            outcome.crashes,
            outcome
                .artifact
                .as_deref()
                .map(|a| format!(" (input: {a})"))
                .unwrap_or_default()
        );
        outcomes.push(outcome);
    }
    let failed = outcomes.iter().filter(|o| o.crashes > 0).count();
    println!("fuzz: {} passed, {failed} failed", outcomes.len() - failed);
    if failed > 0 {
        bail!("{failed} fuzz targets crashed");
    }
    Ok(())
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`.
fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let manifest =
        std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).context("reading fuzz/Cargo.toml")?;
    let mut in_bin = false;
    let mut targets = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(name) = in_bin.then(|| line.strip_prefix("name = ")).flatten() {
            targets.push(name.trim_matches('"').to_string());
        }
    }
    Ok(targets)
}

/// `cargo-fuzz` of [`CARGO_FUZZ_VERSION`], installed into the cache if it is not there yet.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let root = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin/cargo-fuzz");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "xtask fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
        root.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .arg("--root")
        .arg(&root))?;
    Ok(bin)
}

/// Points a cargo-fuzz command at a compiler that takes its `-Z` flags.
fn with_nightly(cmd: &mut Command) -> &mut Command {
    // `cargo xtask` runs under the default toolchain's cargo; cargo-fuzz must pick its own.
    // The sanitized build always goes to `fuzz/target`, where the binaries are run from.
    cmd.env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO_TARGET_DIR");
    if has_nightly() {
        cmd.env("RUSTUP_TOOLCHAIN", "nightly")
    } else {
        cmd.env("RUSTC_BOOTSTRAP", "1")
    }
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("nightly"))
        })
        .unwrap_or(false)
}

/// Runs one target for `seconds` on its corpus; libFuzzer's final statistics are read from its
/// log (`fuzz/artifacts/<target>.log`).
fn run_target(
    fuzz_dir: &Path,
    bin: &Path,
    target: &str,
    seconds: u64,
    runs: Option<u64>,
) -> Result<Outcome> {
    let grown = fuzz_dir.join("corpus-grown").join(target);
    let seeds = fuzz_dir.join("corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&grown, &seeds, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = fuzz_dir.join("artifacts").join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)?;
    eprintln!(
        "xtask fuzz: {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let mut fuzzer = Command::new(bin);
    if let Some(runs) = runs {
        fuzzer.arg(format!("-runs={runs}"));
    }
    let status = fuzzer
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=30")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&grown)
        .arg(&seeds)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let artifact = text
        .lines()
        .find_map(|l| l.split_once("Test unit written to "))
        .map(|(_, path)| path.trim().to_string());
    // What a target survives but reports (a `finding: ` line each, e.g. a panic of virtiofsd's
    // own code that kills only one guest's daemon): shown, not failed.
    for finding in text.lines().filter(|l| l.starts_with("finding: ")) {
        eprintln!("  {target}: {finding}");
    }
    let crashed = !status.success() || artifact.is_some();
    if crashed {
        // The sanitizer's or the panic's report, for the log reader.
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    Ok(Outcome {
        target: target.to_string(),
        execs: stat("number_of_executed_units"),
        execs_per_s: stat("average_exec_per_sec"),
        crashes: u64::from(crashed),
        artifact,
    })
}
