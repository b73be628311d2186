//! `cargo xtask bench boot`: boot-time and overhead figures (a benchmark, not a test: it prints
//! numbers and asserts nothing about them).
//!
//! - Host-side setup, process start to the first `KVM_RUN`, measured on this host directly
//!   (with `--force` where guests cannot boot: setup is the same, the guest is then killed).
//! - Inside the testbed (or directly on a host with hardware KVM): `microvm boot` and QEMU
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
use crate::util::{ensure_debs, run, workspace_root};

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
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum What {
    Boot,
}

const GUEST_MIB: u64 = 128;

pub fn bench(args: &BenchArgs) -> Result<()> {
    match args.what {
        What::Boot if args.inner => boot_inner(args.runs),
        What::Boot => boot(args.runs),
    }
}

fn release_dir() -> PathBuf {
    workspace_root().join("target/release")
}

fn boot(runs: usize) -> Result<()> {
    ensure_debs(&["busybox-static", "qemu-system-x86"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .args(["build", "--release", "-q", "-p", "microvm", "-p", "xtask"])
        .current_dir(workspace_root()))?;
    let microvm = release_dir().join("microvm");
    let work = tempfile::tempdir()?;
    let initrd = bench_initramfs(work.path())?;

    println!("== host-side setup: process start to first KVM_RUN (this host, {runs} runs) ==");
    let (mut setup, mut overhead) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (ms, rss) = first_kvm_run(&microvm, &vmlinux, &initrd)?;
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

/// Starts `microvm boot --force` and returns the VMM's own "first KVM_RUN at X ms" and its RSS
/// split (total, guest memory) just after, then kills it (on a PVM host the guest would only
/// crawl).
fn first_kvm_run(
    microvm: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<(f64, Option<(f64, f64)>)> {
    let mut child = Command::new(microvm)
        .args([
            "boot",
            "--force",
            "--memory",
            &GUEST_MIB.to_string(),
            "--kernel",
        ])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
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
    let microvm = release_dir().join("microvm");
    let work = tempfile::tempdir()?;
    let initrd = bench_initramfs(work.path())?;
    let ours = |sleep: bool| {
        let mut c = Command::new(&microvm);
        c.args(["boot", "--memory", &GUEST_MIB.to_string(), "--kernel"])
            .arg(&vmlinux)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(format!(
                "console=ttyS0 reboot=k panic=-1 pci=off quiet{}",
                if sleep { " SLEEP=1" } else { "" }
            ));
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
            "console=ttyS0 reboot=t panic=-1 pci=off quiet{}",
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
