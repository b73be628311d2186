//! `cargo xtask bench boot|run`: boot-time, run-time and overhead figures (a benchmark, not a
//! test: it prints numbers and asserts nothing about them).
//!
//! `bench run`: `microvm run --rm IMG true` end to end, cold (empty image store: the image is
//! imported and its disk built) and warm, with the phases `microvm run --timings` reports (VMM
//! setup, kernel to agent ready, container start, teardown), next to `crun run` and `runc run`
//! on the same busybox root filesystem, on the same host (inside the testbed where guests cannot
//! boot here). `--debug-build` uses the debug binaries (quicker to build, slower to run).
//!
//! `bench boot`:
//! - Host-side setup, process start to the first `KVM_RUN`, measured on this host directly
//!   (with the config's `force` where guests cannot boot: setup is the same, the guest is then
//!   killed).
//! - Inside the testbed (or directly on a host with hardware KVM): `microvm-vmm` and QEMU
//!   `-M microvm` alternately on the same kernel and initramfs, time from spawn until the
//!   guest's `/init` prints its first line, whole-run wall time, and each VMM's RSS beyond the
//!   guest memory it touched.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use initramfs::Initramfs;

use crate::kernel::{self, KernelArgs};
use crate::util::{ensure_debs, run, target_dir, workspace_root};
use vmm_api::{KernelCmdline, KernelParam, VmConfig};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    what: What,
    /// Runs per VMM.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Internal: the part that runs where guests can boot.
    #[arg(long, hide = true)]
    inner: bool,
    /// `bench run`: use the debug build of microvm (quicker to build; slower host side).
    #[arg(long)]
    debug_build: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum What {
    Boot,
    Run,
}

const GUEST_MIB: u64 = 128;

pub fn bench(args: &BenchArgs) -> Result<()> {
    match args.what {
        What::Boot if args.inner => boot_inner(args.runs),
        What::Boot => boot(args.runs),
        What::Run if args.inner => run_inner(args.runs),
        What::Run => run_bench(args.runs, args.debug_build),
    }
}

fn release_dir() -> PathBuf {
    target_dir().join("release")
}

/// Writes the VMM config for a benchmark guest (`GUEST_MIB`, one vCPU, the initramfs, `params`
/// after the default command line) to `path` and returns it, for `microvm-vmm --config`.
fn bench_config(
    path: PathBuf,
    kernel: &Path,
    initrd: &Path,
    params: Vec<KernelParam>,
    force: bool,
) -> Result<PathBuf> {
    let mut config = VmConfig::new(std::path::absolute(kernel)?);
    config.initrd = Some(std::path::absolute(initrd)?);
    config.memory_mib = GUEST_MIB;
    config.cmdline = KernelCmdline::with_params(params);
    config.force = force;
    std::fs::write(&path, config.to_json()?)?;
    Ok(path)
}

fn boot(runs: usize) -> Result<()> {
    ensure_debs(&["busybox-static", "qemu-system-x86"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "microvm-vmm",
            "-p",
            "xtask",
        ])
        .current_dir(workspace_root()))?;
    let vmm_bin = release_dir().join("microvm-vmm");
    let work = tempfile::tempdir()?;
    let initrd = bench_initramfs(work.path())?;
    let config = bench_config(work.path().join("vm.json"), &vmlinux, &initrd, vec![], true)?;

    println!("== host-side setup: process start to first KVM_RUN (this host, {runs} runs) ==");
    let (mut setup, mut overhead) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (ms, rss) = first_kvm_run(&vmm_bin, &config)?;
        setup.push(ms);
        overhead.extend(rss.map(|(total, guest)| total - guest));
    }
    println!("microvm setup to first KVM_RUN: {}", summary(&setup, "ms"));
    if !overhead.is_empty() {
        println!(
            "microvm RSS beyond guest memory, just after first KVM_RUN: {}",
            summary(&overhead, "MiB")
        );
    }

    let code = if vmm::host::check_can_boot_guests().is_ok() {
        boot_inner(runs).map(|_| 0)?
    } else {
        println!("== this host cannot boot guests; the rest runs inside the testbed ==");
        let xtask = release_dir().join("xtask");
        testbed::Testbed::new()
            .env("MICROVM_KERNEL", &vmlinux)
            // Where the release binaries are, also when CARGO_TARGET_DIR moved them.
            .env("CARGO_TARGET_DIR", target_dir())
            .run(
                &[
                    xtask.as_os_str(),
                    "bench".as_ref(),
                    "boot".as_ref(),
                    "--inner".as_ref(),
                    "--runs".as_ref(),
                    runs.to_string().as_ref(),
                ],
                &workspace_root(),
            )
            .context("testbed")?
    };
    if code != 0 {
        bail!("the in-testbed benchmark failed ({code})");
    }
    Ok(())
}

/// Starts `microvm-vmm --config CONFIG` (a config with `force`) and returns the VMM's own
/// "first KVM_RUN at X ms" and its RSS split (total, guest memory) just after, then kills it (on
/// a PVM host the guest would only crawl).
fn first_kvm_run(vmm_bin: &Path, config: &Path) -> Result<(f64, Option<(f64, f64)>)> {
    let mut child = Command::new(vmm_bin)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut found = None;
    for line in stderr.lines() {
        let line = line?;
        if let Some(ms) = number_after(&line, "first KVM_RUN at ") {
            found = Some(ms);
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let rss = rss_split(child.id(), GUEST_MIB << 20).ok();
    let _ = child.kill();
    let _ = child.wait();
    Ok((found.context("the VMM never reached KVM_RUN")?, rss))
}

fn number_after(line: &str, prefix: &str) -> Option<f64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// busybox `/init`: mounts devtmpfs, writes boot marker 1, prints BOOTED, waits a little (so
/// RSS can be sampled while the VM is alive), resets.
fn bench_initramfs(dir: &Path) -> Result<PathBuf> {
    let mut i = Initramfs::new();
    i.busybox()?;
    i.file(
        "init",
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         /bin/busybox printf '\\001' | /bin/busybox dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null\n\
         echo BOOTED\n\
         /bin/busybox sleep ${SLEEP:-0}\n\
         /bin/busybox reboot -f\n",
        0o755,
    );
    Ok(i.write_file(&dir.join("bench.cpio"))?)
}

struct Sample {
    to_init_ms: f64,
    wall_ms: f64,
}

/// Spawns a VMM, waits for BOOTED on its stdout, optionally samples its RSS, waits for exit.
fn measure(mut cmd: Command, sample_rss: bool) -> Result<(Sample, Option<(f64, f64)>)> {
    let start = Instant::now();
    let mut child: Child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut to_init = None;
    let mut rss = None;
    for line in stdout.lines() {
        let line = line?;
        if line.contains("BOOTED") && to_init.is_none() {
            to_init = Some(start.elapsed());
            if sample_rss {
                std::thread::sleep(Duration::from_millis(300));
                rss = rss_split(child.id(), GUEST_MIB << 20).ok();
            }
        }
    }
    let status = child.wait()?;
    let wall = start.elapsed();
    let to_init = to_init.with_context(|| format!("guest never printed BOOTED ({status})"))?;
    Ok((
        Sample {
            to_init_ms: to_init.as_secs_f64() * 1000.0,
            wall_ms: wall.as_secs_f64() * 1000.0,
        },
        rss,
    ))
}

/// (total RSS, RSS of the guest-memory mapping) in MiB, from /proc/PID/smaps: the guest RAM is
/// the anonymous mapping of exactly the guest's size.
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

fn summary(v: &[f64], unit: &str) -> String {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = s[s.len() / 2];
    format!(
        "median {median:.1} {unit} (min {:.1}, max {:.1}, n={})",
        s[0],
        s[s.len() - 1],
        s.len()
    )
}

fn boot_inner(runs: usize) -> Result<()> {
    let vmlinux = PathBuf::from(std::env::var_os("MICROVM_KERNEL").context("MICROVM_KERNEL")?);
    let vmm_bin = release_dir().join("microvm-vmm");
    let work = tempfile::tempdir()?;
    let initrd = bench_initramfs(work.path())?;
    let sleep = vec![KernelParam::new("SLEEP", "1")];
    let configs = [
        bench_config(
            work.path().join("vm.json"),
            &vmlinux,
            &initrd,
            vec![],
            false,
        )?,
        bench_config(
            work.path().join("vm-sleep.json"),
            &vmlinux,
            &initrd,
            sleep,
            false,
        )?,
    ];
    let ours = |sleep: bool| {
        let mut c = Command::new(&vmm_bin);
        c.arg("--config").arg(&configs[usize::from(sleep)]);
        c
    };
    let qemu = |sleep: bool| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            &GUEST_MIB.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&vmlinux)
        .arg("-initrd")
        .arg(&initrd)
        // QEMU's microvm has no i8042: it resets by triple fault, which -no-reboot turns into exit.
        .arg("-append")
        .arg(format!(
            "{}{}",
            vmm_api::DEFAULT_CMDLINE.replace("reboot=k", "reboot=t"),
            if sleep { " SLEEP=1" } else { "" }
        ));
        c
    };
    println!("== boot to guest /init, same kernel and initramfs, {GUEST_MIB} MiB, 1 vCPU ==");
    let (mut ours_init, mut ours_wall, mut q_init, mut q_wall) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let (s, _) = measure(ours(false), false)?;
        ours_init.push(s.to_init_ms);
        ours_wall.push(s.wall_ms);
        let (s, _) = measure(qemu(false), false)?;
        q_init.push(s.to_init_ms);
        q_wall.push(s.wall_ms);
    }
    println!(
        "microvm    spawn to /init output: {}",
        summary(&ours_init, "ms")
    );
    println!(
        "qemu -M microvm spawn to /init output: {}",
        summary(&q_init, "ms")
    );
    println!(
        "microvm    whole run (boot + reset + exit): {}",
        summary(&ours_wall, "ms")
    );
    println!("qemu -M microvm whole run: {}", summary(&q_wall, "ms"));
    println!(
        "ratio microvm/qemu (spawn to /init, medians): {:.2}",
        median(&ours_init) / median(&q_init)
    );
    println!("== RSS while the guest idles at /init ==");
    for (name, cmd) in [("microvm", ours(true)), ("qemu -M microvm", qemu(true))] {
        match measure(cmd, true)?.1 {
            Some((total, guest)) => println!(
                "{name}: RSS {total:.1} MiB, of which guest memory {guest:.1} MiB, VMM overhead \
                 {:.1} MiB",
                total - guest
            ),
            None => println!("{name}: RSS not sampled"),
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

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

fn run_bench(runs: usize, debug_build: bool) -> Result<()> {
    ensure_debs(&["busybox-static", "e2fsprogs", "crun", "runc"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let agent = crate::agent::build()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build.args(["build", "-q", "-p", "microvm", "-p", "microvm-vmm"]);
    if !debug_build {
        build.arg("--release");
    }
    run(build.current_dir(workspace_root()))?;
    let bin_dir = target_dir().join(if debug_build { "debug" } else { "release" });
    let work = tempfile::Builder::new().prefix("bench-run-").tempdir()?;
    let layout = crate::demo::busybox_oci_layout(&work.path().join("busybox-oci"), &[])?;
    let xtask = std::env::current_exe()?;
    let runs_text = runs.to_string();
    let argv = [
        xtask.as_os_str(),
        "bench".as_ref(),
        "run".as_ref(),
        "--inner".as_ref(),
        "--runs".as_ref(),
        runs_text.as_ref(),
    ];
    let code = if vmm::host::check_can_boot_guests().is_ok() {
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .env("MICROVM_KERNEL", &vmlinux)
            .env("MICROVM_AGENT", &agent)
            .env("BENCH_MICROVM", bin_dir.join("microvm"))
            .env("BENCH_LAYOUT", &layout)
            .status()?;
        status.code().unwrap_or(1)
    } else {
        println!("== this host cannot boot guests; the benchmark runs inside the testbed ==");
        testbed::Testbed::new()
            .env("MICROVM_KERNEL", &vmlinux)
            .env("MICROVM_AGENT", &agent)
            .env("BENCH_MICROVM", bin_dir.join("microvm"))
            .env("BENCH_LAYOUT", &layout)
            .run(&argv, &workspace_root())
            .context("testbed")?
    };
    if code != 0 {
        bail!("the run benchmark failed ({code})");
    }
    Ok(())
}

/// One `microvm run --rm --timings IMG true`: wall ms and the phases.
fn one_run(microvm: &Path, layout: &Path, home: &Path) -> Result<(f64, Vec<(String, f64)>)> {
    let start = Instant::now();
    let out = Command::new(microvm)
        .args(["run", "--rm", "--timings"])
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

fn run_inner(runs: usize) -> Result<()> {
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
