//! `bench boot`:
//! - Host-side setup, process start to the first `KVM_RUN`, measured on this host directly
//!   (with `--force` where guests cannot boot: setup is the same, the guest is then killed), for
//!   each `--setup-memory` size, alternating with the same build's `--no-jail` run (the jail's
//!   cost) and the `--baseline` build when given.
//! - Inside the testbed (or directly on a host with hardware KVM): `microvm boot`, the same with
//!   a virtio-fs device (guest memory a shared memfd instead of anonymous memory, what every VM
//!   with a volume gets), QEMU `-M microvm` and, when given, Firecracker (`--firecracker`) and
//!   another microvm build (`--baseline`), alternately, on the same kernel and initramfs, 128 MiB, 1 vCPU: time from
//!   spawn until the guest's `/init` prints its first line, whole-run wall time, each VMM's RSS
//!   beyond the guest memory it touched, and with `--phases` the guest kernel's own timeline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use initramfs::Initramfs;

mod vmms;

use super::{median, number_after, release_dir, rss_split, summary};
use crate::kernel::{self, KernelArgs};
use crate::util::{ensure_debs, run, workspace_root};
use vmms::{cmdline, firecracker_vmm, microvm_fs_vmm, microvm_vmm, qemu_vmm, Mode};

#[derive(clap::Args)]
pub struct BootArgs {
    /// `bench boot`: also boot with this Firecracker binary (driven by `--no-api
    /// --config-file`); the testbed's L1 then gets `-cpu max` unless MICROVM_TESTBED_CPU says
    /// otherwise (Firecracker needs KVM_CAP_XCRS)
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,
    /// `bench boot`: also measure this other microvm binary (e.g. an older build), alternately
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// `bench boot`: guest memory sizes (MiB) for the host-side setup figures
    #[arg(long, value_delimiter = ',', default_values_t = [128u64, 2048])]
    setup_memory: Vec<u64>,
    /// `bench boot`: one more boot per VMM with `printk.time=1 initcall_debug`, to print the
    /// guest kernel's time to `/init`, its slowest initcalls and its longest silences
    #[arg(long)]
    phases: bool,
    /// Internal: the microvm binary the in-testbed part runs.
    #[arg(long, hide = true)]
    microvm: Option<PathBuf>,
    /// Internal: the virtiofsd binary for the virtio-fs (memfd memory) boots.
    #[arg(long, hide = true)]
    virtiofsd: Option<PathBuf>,
}

/// Guest memory for the boot comparison.
const GUEST_MIB: u64 = 128;
/// Every VMM gets this command line (QEMU with `reboot=t`: its microvm machine has no i8042).
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";
/// What `--phases` adds instead of `quiet`.
const PHASES_CMDLINE: &str = "printk.time=1 initcall_debug loglevel=8";

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))
}

pub(super) fn boot(runs: usize, args: &BootArgs) -> Result<()> {
    ensure_debs(&["busybox-static", "qemu-system-x86"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "microvm",
            "-p",
            "microvm-vmm",
            "-p",
            "xtask",
        ])
        .current_dir(workspace_root()))?;
    let microvm = release_dir().join("microvm");
    let baseline = args.baseline.as_deref().map(absolute).transpose()?;
    let firecracker = args.firecracker.as_deref().map(absolute).transpose()?;
    let virtiofsd = crate::virtiofsd::build()?;
    let work = tempfile::tempdir()?;
    let initrd = bench_initramfs(work.path())?;

    println!("== host-side setup: process start to first KVM_RUN (this host, {runs} runs) ==");
    // The jail's own cost: the same build with and without it.
    let mut binaries = vec![
        ("microvm", microvm.clone(), None),
        ("microvm --no-jail", microvm.clone(), Some("--no-jail")),
    ];
    binaries.extend(baseline.clone().map(|b| ("baseline", b, None)));
    for &mib in &args.setup_memory {
        let mut setup = vec![Vec::new(); binaries.len()];
        let mut overhead = Vec::new();
        for _ in 0..runs {
            // Alternate the binaries so a loaded machine hurts both alike.
            for (i, (_, bin, flag)) in binaries.iter().enumerate() {
                let (ms, rss) = first_kvm_run(bin, *flag, &vmlinux, &initrd, mib)?;
                setup[i].push(ms);
                if i == 0 {
                    overhead.extend(rss.map(|(total, guest)| total - guest));
                }
            }
        }
        for ((name, _, _), v) in binaries.iter().zip(&setup) {
            println!(
                "{name} {mib} MiB, setup to first KVM_RUN: {}",
                summary(v, "ms")
            );
        }
        if !overhead.is_empty() {
            println!(
                "microvm {mib} MiB, RSS beyond guest memory just after first KVM_RUN: {}",
                summary(&overhead, "MiB")
            );
        }
    }

    let mut inner_args: Vec<std::ffi::OsString> = vec![
        "bench".into(),
        "boot".into(),
        "--inner".into(),
        "--runs".into(),
        runs.to_string().into(),
        "--microvm".into(),
        microvm.clone().into(),
        "--virtiofsd".into(),
        virtiofsd.into(),
    ];
    for (flag, path) in [("--baseline", &baseline), ("--firecracker", &firecracker)] {
        if let Some(path) = path {
            inner_args.push(flag.into());
            inner_args.push(path.clone().into());
        }
    }
    if args.phases {
        inner_args.push("--phases".into());
    }
    let xtask = release_dir().join("xtask");
    let code = if vmm::host::check_can_boot_guests().is_ok() {
        let status = Command::new(&xtask)
            .args(&inner_args)
            .env("MICROVM_KERNEL", &vmlinux)
            .status()?;
        status.code().unwrap_or(1)
    } else {
        println!("== this host cannot boot guests; the rest runs inside the testbed ==");
        let mut testbed = testbed::Testbed::new().env("MICROVM_KERNEL", &vmlinux);
        if firecracker.is_some() && std::env::var_os("MICROVM_TESTBED_CPU").is_none() {
            testbed = testbed.cpu("max");
        }
        let mut argv = vec![xtask.into_os_string()];
        argv.extend(inner_args);
        testbed.run(&argv, &workspace_root()).context("testbed")?
    };
    if code != 0 {
        bail!("the in-testbed benchmark failed ({code})");
    }
    Ok(())
}

/// Starts `microvm boot --force [flag]` and returns the VMM's own "first KVM_RUN at X ms" (for
/// a jailed VMM: since the supervisor started, the jail included) and its RSS
/// split (total, guest memory) just after, then kills it (on a PVM host the guest would only
/// crawl).
fn first_kvm_run(
    microvm: &Path,
    flag: Option<&str>,
    kernel: &Path,
    initrd: &Path,
    mib: u64,
) -> Result<(f64, Option<(f64, f64)>)> {
    let mut child = Command::new(microvm)
        .args(["boot", "--force", "--memory", &mib.to_string()])
        .args(flag)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .stdin(Stdio::null())
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
    let rss = rss_split(vmm_pid(child.id()), mib << 20).ok();
    let _ = child.kill();
    let _ = child.wait();
    Ok((found.context("the VMM never reached KVM_RUN")?, rss))
}

/// The process that runs the VM below `pid`: the last of its only-child descendants (`microvm
/// boot` → the jail's supervisor → the jailed VMM; `pid` itself for a VMM that is exec'd).
fn vmm_pid(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
    match children
        .as_deref()
        .map(str::split_whitespace)
        .map(|mut c| (c.next(), c.next()))
    {
        Ok((Some(only), None)) => only.parse().map_or(pid, vmm_pid),
        _ => pid,
    }
}

/// busybox `/init`: mounts devtmpfs, writes boot marker 1, prints BOOTED with the guest's
/// uptime (the kernel's own clock since it started counting), waits a little (so RSS can be
/// sampled while the VM is alive), resets.
fn bench_initramfs(dir: &Path) -> Result<PathBuf> {
    let mut i = Initramfs::new();
    i.busybox()?;
    i.file(
        "init",
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         /bin/busybox printf '\\001' | /bin/busybox dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null\n\
         /bin/busybox mkdir -p /proc\n\
         /bin/busybox mount -t proc proc /proc\n\
         echo BOOTED uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime)\n\
         /bin/busybox sleep ${SLEEP:-0}\n\
         /bin/busybox reboot -f\n",
        0o755,
    );
    Ok(i.write_file(&dir.join("bench.cpio"))?)
}

struct Sample {
    to_init_ms: f64,
    /// The guest kernel's uptime when `/init` printed BOOTED.
    uptime_ms: Option<f64>,
    wall_ms: f64,
    rss: Option<(f64, f64)>,
    /// The guest's console output up to BOOTED.
    console: Vec<String>,
}

/// Spawns a VMM, waits for BOOTED on its stdout, optionally samples its RSS, waits for exit.
fn measure(mut cmd: Command, sample_rss: bool) -> Result<Sample> {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut to_init, mut rss, mut console, mut uptime_ms) = (None, None, Vec::new(), None);
    for line in stdout.lines() {
        let line = line?;
        if to_init.is_some() {
            continue;
        }
        if line.contains("BOOTED") {
            to_init = Some(start.elapsed());
            uptime_ms = number_after(&line, "BOOTED uptime ").map(|s| s * 1000.0);
            if sample_rss {
                std::thread::sleep(Duration::from_millis(300));
                rss = rss_split(vmm_pid(child.id()), GUEST_MIB << 20).ok();
            }
        }
        console.push(line);
    }
    let status = child.wait()?;
    let wall = start.elapsed();
    let to_init = to_init.with_context(|| format!("guest never printed BOOTED ({status})"))?;
    Ok(Sample {
        to_init_ms: to_init.as_secs_f64() * 1000.0,
        uptime_ms,
        wall_ms: wall.as_secs_f64() * 1000.0,
        rss,
        console,
    })
}

pub(super) fn boot_inner(runs: usize, args: &BootArgs) -> Result<()> {
    let vmlinux = PathBuf::from(std::env::var_os("MICROVM_KERNEL").context("MICROVM_KERNEL")?);
    let microvm = args
        .microvm
        .clone()
        .unwrap_or(release_dir().join("microvm"));
    let work = tempfile::tempdir()?;
    let initrd = bench_initramfs(work.path())?;
    let mut vmms = vec![microvm_vmm(
        "microvm",
        microvm.clone(),
        vmlinux.clone(),
        initrd.clone(),
    )];
    if let Some(virtiofsd) = &args.virtiofsd {
        let (k, i, d) = (vmlinux.clone(), initrd.clone(), work.path().to_path_buf());
        vmms.push(microvm_fs_vmm(microvm, k, i, virtiofsd.clone(), d));
    }
    if let Some(bin) = &args.baseline {
        let (k, i) = (vmlinux.clone(), initrd.clone());
        vmms.push(microvm_vmm("microvm (baseline)", bin.clone(), k, i));
    }
    if let Some(bin) = &args.firecracker {
        let (k, i, d) = (vmlinux.clone(), initrd.clone(), work.path().to_path_buf());
        vmms.push(firecracker_vmm(bin.clone(), k, i, d));
    }
    vmms.push(qemu_vmm(vmlinux.clone(), initrd.clone()));

    println!(
        "== boot to guest /init, same kernel and initramfs, {GUEST_MIB} MiB, 1 vCPU, {runs} \
         alternating runs, command line `{}` ==",
        cmdline(Mode::Quiet, "reboot=k")
    );
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (vmm, s) in vmms.iter().zip(&mut samples) {
            s.push(measure(
                (vmm.command)(&cmdline(Mode::Quiet, "reboot=k"))?,
                false,
            )?);
        }
    }
    let to_init: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| s.iter().map(|x| x.to_init_ms).collect())
        .collect();
    let ours = median(&to_init[0]);
    println!(
        "| VMM | spawn to /init output, median | runs (ms) | ratio to microvm | guest uptime at \
         /init, median | spawn to kernel clock start, median | whole run, median |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ((vmm, t), s) in vmms.iter().zip(&to_init).zip(&samples) {
        let walls: Vec<f64> = s.iter().map(|x| x.wall_ms).collect();
        let runs: Vec<String> = t.iter().map(|x| format!("{x:.0}")).collect();
        let uptimes: Vec<f64> = s.iter().filter_map(|x| x.uptime_ms).collect();
        let before_kernel: Vec<f64> = s
            .iter()
            .filter_map(|x| Some(x.to_init_ms - x.uptime_ms?))
            .collect();
        let ms_or_dash = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0} ms", median(v))
            }
        };
        println!(
            "| {} | {:.0} ms | {} | {:.2} | {} | {} | {:.0} ms |",
            vmm.name,
            median(t),
            runs.join(" "),
            median(t) / ours,
            ms_or_dash(&uptimes),
            ms_or_dash(&before_kernel),
            median(&walls)
        );
    }

    println!("== RSS while the guest idles at /init ==");
    for vmm in &vmms {
        match measure((vmm.command)(&cmdline(Mode::Idle, "reboot=k"))?, true)?.rss {
            Some((total, guest)) => println!(
                "{}: RSS {total:.1} MiB, of which guest memory {guest:.1} MiB, VMM overhead \
                 {:.1} MiB",
                vmm.name,
                total - guest
            ),
            None => println!("{}: RSS not sampled", vmm.name),
        }
    }

    if args.phases {
        println!(
            "== guest kernel timeline, one boot each with `{PHASES_CMDLINE}` (the console \
             output itself slows these boots) =="
        );
        let symbols = kernel_symbols(&vmlinux);
        for vmm in &vmms {
            let s = measure((vmm.command)(&cmdline(Mode::Phases, "reboot=k"))?, false)?;
            print_phases(vmm.name, &s, &symbols);
        }
    }
    Ok(())
}

/// A console line's printk time in ms and its text.
fn printk_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (time, text) = rest.split_once(']')?;
    Some((time.trim().parse::<f64>().ok()? * 1000.0, text.trim()))
}

/// `initcall NAME+0x0/0x10 returned 0 after 123 usecs` → (NAME, ms).
fn initcall_time(text: &str) -> Option<(&str, f64)> {
    let rest = text.strip_prefix("initcall ")?;
    let name = rest.split(['+', ' ']).next()?;
    let usecs = number_after(rest, " after ")?;
    Some((name, usecs / 1000.0))
}

/// The kernel's function symbols by address (`nm`), to name the initcalls of a kernel built
/// without kallsyms; empty if `nm` is missing.
fn kernel_symbols(vmlinux: &Path) -> HashMap<String, String> {
    let Ok(out) = Command::new("nm").arg(vmlinux).output() else {
        return HashMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (addr, kind, name) = (w.next()?, w.next()?, w.next()?);
            matches!(kind, "t" | "T").then(|| (format!("0x{addr}"), name.to_string()))
        })
        .collect()
}

fn print_phases(name: &str, s: &Sample, symbols: &HashMap<String, String>) {
    let lines: Vec<(f64, &str)> = s.console.iter().filter_map(|l| printk_line(l)).collect();
    let init = lines
        .iter()
        .find(|(_, t)| t.starts_with("Run /init"))
        .map(|(ms, _)| *ms);
    let mut initcalls: Vec<(&str, f64)> =
        lines.iter().filter_map(|(_, t)| initcall_time(t)).collect();
    initcalls.sort_by(|a, b| b.1.total_cmp(&a.1));
    let initcall_total: f64 = initcalls.iter().map(|x| x.1).sum();
    let mut gaps: Vec<(f64, &str, &str)> = lines
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[0].1, w[1].1))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "{name}: spawn to /init output {:.0} ms; kernel clock at `Run /init` {}; initcalls \
         {initcall_total:.1} ms in all",
        s.to_init_ms,
        init.map_or("not seen".into(), |ms| format!("{ms:.1} ms"))
    );
    let top: Vec<String> = initcalls
        .iter()
        .take(6)
        .map(|(n, ms)| {
            let n = symbols.get(*n).map_or(*n, String::as_str);
            format!("{n} {ms:.1}")
        })
        .collect();
    println!("    slowest initcalls (ms): {}", top.join(", "));
    for (ms, before, after) in gaps.iter().take(4) {
        let before: String = before.chars().take(60).collect();
        let after: String = after.chars().take(60).collect();
        println!("    {ms:.1} ms between `{before}` and `{after}`");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printk_lines_and_initcalls_parse() {
        let (ms, text) = printk_line(
            "[    0.123456] initcall virtio_mmio_init+0x0/0x20 returned 0 after 1500 usecs",
        )
        .unwrap();
        assert!((ms - 123.456).abs() < 1e-6);
        assert_eq!(initcall_time(text), Some(("virtio_mmio_init", 1.5)));
        assert!(printk_line("BOOTED").is_none());
        assert!(initcall_time("calling  foo+0x0/0x10 @ 1").is_none());
    }
}
