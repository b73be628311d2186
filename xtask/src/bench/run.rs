//! `bench run`: `microvm run --rm IMG true` end to end, cold (empty image store: the image is
//! imported and its disk built) and warm, with the phases `microvm run --timings` reports (VMM
//! setup, kernel to agent ready, container start, teardown), next to `crun run` and `runc run`
//! on the same busybox root filesystem, on the same host (inside the testbed where guests cannot
//! boot here). `--debug-build` uses the debug binaries (quicker to build, slower to run).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{median, summary};
use crate::kernel::{self, KernelArgs};
use crate::util::ensure_debs;

/// The phases `microvm run --timings` prints, by name, in ms.
fn parse_timings(stderr: &str) -> Vec<(String, f64)> {
    let Some(line) = stderr
        .lines()
        .find_map(|l| l.strip_prefix("microvm timings: "))
    else {
        return Vec::new();
    };
    line.split(", ")
        .filter_map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (name, value) = match words.as_slice() {
                [name @ .., value, "ms"] => (name.join(" "), value.parse().ok()?),
                _ => return None,
            };
            Some((name, value))
        })
        .collect()
}

pub(super) fn run_bench(runs: usize, debug_build: bool) -> Result<()> {
    ensure_debs(&["busybox-static", "e2fsprogs", "crun", "runc"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let agent = crate::agent::build()?;
    let bin_dir = super::build_microvm(debug_build)?;
    let work = tempfile::Builder::new().prefix("bench-run-").tempdir()?;
    let layout = crate::demo::busybox_oci_layout(&work.path().join("busybox-oci"), &[])?;
    super::run_inner(
        &["run", "--runs", &runs.to_string()],
        &[
            ("MICROVM_KERNEL", vmlinux.into_os_string()),
            ("MICROVM_AGENT", agent.into_os_string()),
            ("BENCH_MICROVM", bin_dir.join("microvm").into_os_string()),
            ("BENCH_LAYOUT", layout.into_os_string()),
        ],
    )
}

/// One `microvm run --rm --timings IMG true`: wall ms and the phases.
fn one_run(microvm: &Path, layout: &Path, home: &Path) -> Result<(f64, Vec<(String, f64)>)> {
    let start = Instant::now();
    let out = Command::new(microvm)
        // No network: crun and runc beside it get none either.
        .args(["run", "--rm", "--timings", "--network", "none"])
        .arg(layout)
        .arg("true")
        .env("MICROVM_HOME", home)
        .output()?;
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("microvm run failed ({}): {stderr}", out.status);
    }
    Ok((wall, parse_timings(&stderr)))
}

fn print_runs(label: &str, samples: &[(f64, Vec<(String, f64)>)]) {
    let walls: Vec<f64> = samples.iter().map(|s| s.0).collect();
    println!("{label}: {}", summary(&walls, "ms"));
    let Some((_, first)) = samples.first() else {
        return;
    };
    let phases: Vec<String> = first
        .iter()
        .map(|(name, _)| {
            let v: Vec<f64> = samples
                .iter()
                .filter_map(|(_, p)| p.iter().find(|(n, _)| n == name).map(|x| x.1))
                .collect();
            format!("{name} {:.0}", median(&v))
        })
        .collect();
    println!("    phases, medians in ms: {}", phases.join(", "));
}

pub(super) fn run_inner(runs: usize) -> Result<()> {
    let microvm = PathBuf::from(std::env::var_os("BENCH_MICROVM").context("BENCH_MICROVM")?);
    let layout = PathBuf::from(std::env::var_os("BENCH_LAYOUT").context("BENCH_LAYOUT")?);
    let work = tempfile::Builder::new().prefix("bench-run-").tempdir()?;
    println!("== `microvm run --rm IMG true`, busybox image, {runs} runs each ==");
    let mut cold = Vec::new();
    for i in 0..runs {
        let home = work.path().join(format!("cold{i}"));
        cold.push(one_run(&microvm, &layout, &home)?);
    }
    print_runs("microvm run, cold (empty image store)", &cold);
    let warm_home = work.path().join("warm");
    one_run(&microvm, &layout, &warm_home)?;
    let mut warm = Vec::new();
    for _ in 0..runs {
        warm.push(one_run(&microvm, &layout, &warm_home)?);
    }
    print_runs("microvm run, warm (image stored, disk built)", &warm);

    // The same root filesystem under crun and runc.
    let bundle = work.path().join("bundle");
    crate::demo::busybox_rootfs(&bundle.join("rootfs"))?;
    for runtime in ["crun", "runc"] {
        let _ = std::fs::remove_file(bundle.join("config.json"));
        let spec = Command::new(runtime)
            .arg("spec")
            .current_dir(&bundle)
            .status();
        if !matches!(spec, Ok(s) if s.success()) {
            println!("{runtime}: not available");
            continue;
        }
        let config = std::fs::read_to_string(bundle.join("config.json"))?
            .replace("\"terminal\": true", "\"terminal\": false")
            .replace("\"sh\"", "\"true\"");
        std::fs::write(bundle.join("config.json"), config)?;
        let mut walls = Vec::new();
        for i in 0..runs {
            let start = Instant::now();
            let out = Command::new(runtime)
                .args(["run", "-b"])
                .arg(&bundle)
                .arg(format!("bench-{runtime}-{i}"))
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!(
                    "{runtime} run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            walls.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "{runtime} run (same rootfs, no VM): {}",
            summary(&walls, "ms")
        );
    }
    Ok(())
}
