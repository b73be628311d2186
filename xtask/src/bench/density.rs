//! `bench density`: N idle VMs at once. For each N (`--counts`, default 1,5,10): N `microvm run
//! -d IMG sleep 600` started together, the time until all are running (`run -d` returns once
//! the container runs), the host memory each costs, then the same N as `runc run -d`
//! containers of the same busybox root filesystem, printed side by side. Inside the testbed
//! where this host cannot boot guests.
//!
//! Host memory per VM: the PSS (`/proc/PID/smaps_rollup`) of its VMM and of the `microvm
//! __monitor` that owns it (no virtiofsd: no volumes), the guest memory actually touched (the
//! RSS of the guest-RAM mapping, inside the VMM's PSS), and the drop of the host's
//! `MemAvailable` per VM (which also counts kernel memory: KVM's page tables, the page cache of
//! the shared root disk). For runc: the PSS of the container's processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::rss_split;
use crate::kernel::{self, KernelArgs};
use crate::util::ensure_debs;

/// The VMs' memory: `microvm run`'s default.
const GUEST_MIB: u64 = 256;

pub(super) fn density_bench(counts: &[usize], debug_build: bool) -> Result<()> {
    ensure_debs(&["busybox-static", "e2fsprogs", "runc"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let agent = crate::agent::build()?;
    let bin_dir = super::build_microvm(debug_build)?;
    let work = tempfile::Builder::new()
        .prefix("bench-density-")
        .tempdir()?;
    let layout = crate::demo::busybox_oci_layout(&work.path().join("busybox-oci"), &[])?;
    let counts_text = counts_text(counts, ",");
    super::run_inner(
        &["density", "--counts", &counts_text],
        &[
            ("MICROVM_KERNEL", vmlinux.into_os_string()),
            ("MICROVM_AGENT", agent.into_os_string()),
            ("BENCH_MICROVM", bin_dir.join("microvm").into_os_string()),
            ("BENCH_LAYOUT", layout.into_os_string()),
        ],
    )
}

/// One row of the table.
struct Row {
    n: usize,
    /// Seconds until all N were running.
    ready_s: f64,
    /// The longest a 100 ms sleep of this host overran while they started, in seconds: how
    /// responsive the host stayed.
    stall_s: f64,
    /// Per VM or container, MiB: PSS of the VMM beyond its guest RAM, guest RAM touched, PSS of
    /// the helper processes (monitor), drop of MemAvailable.
    vmm_mib: f64,
    guest_mib: f64,
    helper_mib: f64,
    avail_drop_mib: f64,
}

pub(super) fn density_inner(counts: &[usize]) -> Result<()> {
    let microvm = PathBuf::from(std::env::var_os("BENCH_MICROVM").context("BENCH_MICROVM")?);
    let layout = PathBuf::from(std::env::var_os("BENCH_LAYOUT").context("BENCH_LAYOUT")?);
    let work = tempfile::Builder::new()
        .prefix("bench-density-")
        .tempdir()?;
    let home = work.path().join("home");
    // The image imported and its disk built once, so that the rows measure starts only.
    let warm = Command::new(&microvm)
        .args(["run", "--rm"])
        .arg(&layout)
        .arg("true")
        .env("MICROVM_HOME", &home)
        .output()?;
    if !warm.status.success() {
        bail!(
            "microvm run (warm-up) failed: {}",
            String::from_utf8_lossy(&warm.stderr)
        );
    }
    let bundle = work.path().join("bundle");
    let runc = runc_bundle(&bundle)?;

    let mut vms = Vec::new();
    let mut containers = Vec::new();
    for &n in counts {
        // A count the host cannot hold is a result too: say so and go on.
        match microvm_row(&microvm, &layout, &home, n) {
            Ok(row) => vms.push(row),
            Err(e) => println!("microvm, {n} at once: {e:#}"),
        }
        if runc {
            match runc_row(&bundle, n) {
                Ok(row) => containers.push(row),
                Err(e) => println!("runc, {n} at once: {e:#}"),
            }
        }
    }
    println!(
        "== {} idle busybox VMs ({GUEST_MIB} MiB, 1 vCPU, `sleep 600`) vs runc containers ==",
        counts_text(counts, "/")
    );
    println!(
        "{:>3} | {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} | {:>12} {:>9} {:>10}",
        "N",
        "VMs ready s",
        "stall s",
        "VMM MiB",
        "guest MiB",
        "mon. MiB",
        "PSS/VM",
        "avail/VM",
        "runc ready s",
        "PSS/ctr",
        "avail/ctr"
    );
    for vm in &vms {
        let (ready, pss, avail) = containers.iter().find(|c| c.n == vm.n).map_or(
            ("-".to_string(), "-".to_string(), "-".to_string()),
            |c: &Row| {
                (
                    format!("{:.1}", c.ready_s),
                    format!("{:.1}", c.vmm_mib),
                    format!("{:.1}", c.avail_drop_mib),
                )
            },
        );
        println!(
            "{:>3} | {:>12.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} | {:>12} {:>9} {:>10}",
            vm.n,
            vm.ready_s,
            vm.stall_s,
            vm.vmm_mib,
            vm.guest_mib,
            vm.helper_mib,
            vm.vmm_mib + vm.guest_mib + vm.helper_mib,
            vm.avail_drop_mib,
            ready,
            pss,
            avail
        );
    }
    println!(
        "(stall: the longest a 100 ms sleep here overran while the VMs started; per VM, MiB: \
         the VMM's PSS beyond guest RAM, guest RAM touched, the monitor's PSS, \
         their sum, and the drop of MemAvailable; per runc container: its processes' PSS)"
    );
    Ok(())
}

fn counts_text(counts: &[usize], separator: &str) -> String {
    counts
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(separator)
}

/// N `microvm run -d` at once, measured, then removed.
fn microvm_row(microvm: &Path, layout: &Path, home: &Path, n: usize) -> Result<Row> {
    let before = mem_available_mib()?;
    let start = Instant::now();
    let watch = StallWatch::start();
    let outcomes: Vec<std::io::Result<std::process::Output>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    Command::new(microvm)
                        .args(["run", "-d", "--name", &format!("d{n}-{i}")])
                        // Many boots at once on a slow host (the testbed's one TCG vCPU) take
                        // longer than one: the row measures how long, rather than giving up.
                        .args(["--boot-timeout", "1800"])
                        .arg(layout)
                        .args(["sleep", "600"])
                        .env("MICROVM_HOME", home)
                        .stdin(Stdio::null())
                        .output()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ready_s = start.elapsed().as_secs_f64();
    let stall_s = watch.stop();
    let mut failed = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            Ok(o) if o.status.success() => {}
            Ok(o) => failed.push(format!(
                "d{n}-{i}: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim_end()
            )),
            Err(e) => failed.push(format!("d{n}-{i}: {e}")),
        }
    }
    let row = if failed.is_empty() {
        let after = mem_available_mib()?;
        let (mut vmm, mut guest, mut helper) = (0.0, 0.0, 0.0);
        // Each run's `run.json` names its monitor (`owner_pid`); the VMM is the monitor's child.
        for entry in std::fs::read_dir(home.join("runs"))? {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(entry?.path().join("run.json"))?)?;
            let monitor = record["owner_pid"]
                .as_u64()
                .context("a detached run without its monitor's pid")?
                as u32;
            helper += pss_mib(monitor)?;
            // The jail's supervisor and, below it, the jailed VMM (PID 1 of its namespace):
            // both are `microvm-vmm`, and the guest RAM is the jailed one's.
            for vmm_pid in descendants(monitor) {
                let cmdline = std::fs::read(format!("/proc/{vmm_pid}/cmdline")).unwrap_or_default();
                let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
                if argv0.ends_with(b"microvm-vmm") {
                    let (_, guest_mib) = rss_split(vmm_pid, GUEST_MIB << 20)?;
                    vmm += pss_mib(vmm_pid)? - guest_mib;
                    guest += guest_mib;
                }
            }
        }
        let per = n as f64;
        Some(Row {
            n,
            ready_s,
            stall_s,
            vmm_mib: vmm / per,
            guest_mib: guest / per,
            helper_mib: helper / per,
            avail_drop_mib: (before - after) / per,
        })
    } else {
        None
    };
    let names: Vec<String> = (0..n).map(|i| format!("d{n}-{i}")).collect();
    let _ = Command::new(microvm)
        .args(["rm", "-f"])
        .args(&names)
        .env("MICROVM_HOME", home)
        .stdout(Stdio::null())
        .status();
    match row {
        Some(row) => Ok(row),
        None => bail!("{n} VMs at once: {}", failed.join("\n")),
    }
}

/// A runc bundle of the busybox root filesystem running `sleep 600`; false without runc.
fn runc_bundle(bundle: &Path) -> Result<bool> {
    crate::demo::busybox_rootfs(&bundle.join("rootfs"))?;
    let spec = Command::new("runc")
        .arg("spec")
        .current_dir(bundle)
        .status();
    if !matches!(spec, Ok(s) if s.success()) {
        println!("runc: not available");
        return Ok(false);
    }
    let config = std::fs::read_to_string(bundle.join("config.json"))?
        .replace("\"terminal\": true", "\"terminal\": false")
        .replace("\"sh\"", "\"sleep\", \"600\"");
    std::fs::write(bundle.join("config.json"), config)?;
    Ok(true)
}

/// N `runc run -d` at once, measured, then removed.
fn runc_row(bundle: &Path, n: usize) -> Result<Row> {
    let before = mem_available_mib()?;
    let ids: Vec<String> = (0..n).map(|i| format!("bench-density-{n}-{i}")).collect();
    let start = Instant::now();
    let watch = StallWatch::start();
    // runc's detached, terminal-less container inherits runc's stdio: a pipe here would hold
    // `output()` until the container's `sleep 600` ended. Its stderr goes to a file instead.
    let log = |id: &str| bundle.with_file_name(format!("{id}.stderr"));
    let outcomes: Vec<std::io::Result<std::process::ExitStatus>> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let log = log(id);
                s.spawn(move || {
                    Command::new("runc")
                        .args(["run", "-d"])
                        .arg("--bundle")
                        .arg(bundle)
                        .arg(id)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(log)?)
                        .status()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ready_s = start.elapsed().as_secs_f64();
    let stall_s = watch.stop();
    let after = mem_available_mib()?;
    let mut pss = 0.0;
    let mut failed = Vec::new();
    for (id, o) in ids.iter().zip(&outcomes) {
        match o {
            Ok(status) if status.success() => {
                let state = Command::new("runc").args(["state", id]).output()?;
                let state: serde_json::Value = serde_json::from_slice(&state.stdout)?;
                match state["pid"].as_u64() {
                    Some(pid) if pid != 0 => pss += pss_mib(pid as u32)?,
                    _ => failed.push(format!("{id} is not running: {state}")),
                }
            }
            Ok(status) => failed.push(format!(
                "{id}: {status}: {}",
                std::fs::read_to_string(log(id))
                    .unwrap_or_default()
                    .trim_end()
            )),
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    for id in &ids {
        let _ = Command::new("runc")
            .args(["delete", "-f", id])
            .stderr(Stdio::null())
            .status();
    }
    if !failed.is_empty() {
        bail!("{n} runc containers at once: {}", failed.join("\n"));
    }
    let per = n as f64;
    Ok(Row {
        n,
        ready_s,
        stall_s,
        vmm_mib: pss / per,
        guest_mib: 0.0,
        helper_mib: 0.0,
        avail_drop_mib: (before - after) / per,
    })
}

/// A thread that sleeps 100 ms at a time and keeps the longest overrun: a host that stops
/// making progress (the L1 stalls of issue #15) shows as seconds here.
struct StallWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl StallWatch {
    const TICK: std::time::Duration = std::time::Duration::from_millis(100);

    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut worst = 0.0f64;
            while !seen.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(Self::TICK);
                worst = worst.max((t.elapsed() - Self::TICK).as_secs_f64());
            }
            worst
        });
        Self { stop, thread }
    }

    /// The longest overrun, in seconds.
    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(f64::NAN)
    }
}

/// `Pss:` of `/proc/PID/smaps_rollup`, in MiB.
fn pss_mib(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("smaps_rollup of {pid}"))?;
    kib_field(&text, "Pss:").with_context(|| format!("no Pss in smaps_rollup of {pid}"))
}

fn mem_available_mib() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    kib_field(&text, "MemAvailable:").context("no MemAvailable in /proc/meminfo")
}

/// The `KEY  N kB` line's N, in MiB.
fn kib_field(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Every process below `pid`, depth first.
fn descendants(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .flat_map(|child| std::iter::once(child).chain(descendants(child)))
        .collect()
}

/// The children of `pid` (of all its threads).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_are_read_in_mib() {
        let text = "Rss:                2048 kB\nPss:                1536 kB\n";
        assert_eq!(kib_field(text, "Pss:"), Some(1.5));
        assert_eq!(kib_field(text, "Swap:"), None);
    }

    #[test]
    fn a_stall_watch_sees_a_stopped_process() {
        // The process stopped (SIGSTOP from a child) for 600 ms shows as about that.
        let watch = StallWatch::start();
        std::thread::sleep(std::time::Duration::from_millis(150));
        let me = std::process::id().to_string();
        let status = Command::new("sh")
            .args(["-c", "kill -STOP $0; sleep 0.6; kill -CONT $0"])
            .arg(&me)
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(std::time::Duration::from_millis(150));
        let stall = watch.stop();
        assert!((0.4..5.0).contains(&stall), "{stall}");
    }

    #[test]
    fn this_process_has_a_pss() {
        assert!(pss_mib(std::process::id()).unwrap() > 0.0);
    }

    #[test]
    fn descendants_reach_a_grandchild() {
        // sh → sh → sleep: the jail's supervisor → the jailed VMM has the same shape.
        let mut shell = Command::new("sh")
            .args(["-c", "sh -c 'sleep 30 & wait' & wait"])
            .spawn()
            .unwrap();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = descendants(shell.id());
            if found.len() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let names: Vec<String> = found
            .iter()
            .map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default())
            .collect();
        let _ = Command::new("pkill")
            .args(["-P", &found[0].to_string()])
            .status();
        let _ = shell.kill();
        let _ = shell.wait();
        assert_eq!(found.len(), 2, "{names:?}");
        assert_eq!(names[1].trim(), "sleep", "{names:?}");
    }
}
