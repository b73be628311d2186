//! `bench fs`: file I/O on a shared host directory, `microvm run -v DIR:/data` (virtio-fs through
//! the VM's confined virtiofsd) next to a runc container with a bind mount of a directory on the
//! same host (inside the testbed where guests cannot boot here), on the same busybox root
//! filesystem and the same workload: a sequential write and a sequential read of one file, then
//! small files created and stat'ed. The workload times itself inside the container (the
//! container's `/proc/uptime`, the guest's clock for microvm) and prints one line per phase,
//! which this side parses. virtiofsd's RSS and PSS are sampled from `/proc/PID/smaps_rollup`
//! while the workload runs.
//!
//! The file read is written by the host before the container starts (into a second, read-only
//! volume), with the host's page cache dropped just before: neither the guest nor the container
//! has read it yet. The file written is a new one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::median;
use crate::kernel::{self, KernelArgs};
use crate::util::ensure_debs;

#[derive(clap::Args)]
pub struct FsArgs {
    /// `bench fs`: the size of the file written and of the file read, in MiB.
    #[arg(long, default_value_t = 16)]
    file_mib: u32,
    /// `bench fs`: how many small files are created, then stat'ed.
    #[arg(long, default_value_t = 500)]
    files: u32,
}

/// One timed phase of the workload, as the container printed it.
#[derive(Debug, Clone, PartialEq)]
struct Phase {
    name: String,
    /// MiB for the file phases, files for the small-file phases.
    amount: f64,
    unit: String,
    ms: f64,
}

impl Phase {
    /// MiB/s or files/s; `None` when the phase was below the clock's resolution.
    fn rate(&self) -> Option<f64> {
        (self.ms > 0.0).then(|| self.amount / (self.ms / 1000.0))
    }
}

const PHASE_PREFIX: &str = "fsbench: ";

/// The workload, a busybox `sh -c` script: `/src/read.bin` is the file to read, `/data` the
/// directory written. Time comes from `/proc/uptime` (centiseconds) read by the shell's `read`
/// builtin, so taking it forks nothing; `1${x#*.} - 100` keeps a fraction like `08` from being
/// read as octal.
fn workload(args: &FsArgs) -> String {
    let (mib, files) = (args.file_mib, args.files);
    format!(
        r#"set -e
cs() {{ echo $(( ${{1%.*}} * 100 + 1${{1#*.}} - 100 )); }}
report() {{ echo "{PHASE_PREFIX}$1 $2 $3 in $(( ($(cs $5) - $(cs $4)) * 10 )) ms"; }}
cd /data
read a _ < /proc/uptime
dd if=/dev/zero of=write.bin bs=1M count={mib} conv=fsync 2>/dev/null
read b _ < /proc/uptime
report write {mib} MiB $a $b
read a _ < /proc/uptime
dd if=/src/read.bin of=/dev/null bs=1M 2>/dev/null
read b _ < /proc/uptime
report read {mib} MiB $a $b
mkdir small
read a _ < /proc/uptime
i=0
while [ $i -lt {files} ]; do : > small/f$i; i=$((i + 1)); done
read b _ < /proc/uptime
report create {files} files $a $b
read a _ < /proc/uptime
stat -c %s small/* > /dev/null
read b _ < /proc/uptime
report stat {files} files $a $b
"#
    )
}

/// The phases in the workload's output: lines `fsbench: NAME AMOUNT UNIT in MS ms`.
fn parse_phases(stdout: &str) -> Vec<Phase> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix(PHASE_PREFIX)?;
            match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                [name, amount, unit, "in", ms, "ms"] => Some(Phase {
                    name: name.to_string(),
                    amount: amount.parse().ok()?,
                    unit: unit.to_string(),
                    ms: ms.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// RSS and PSS in KiB from a `/proc/PID/smaps_rollup`.
fn parse_rss_pss(smaps_rollup: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        smaps_rollup.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == name).then(|| words.next()?.parse().ok())?
        })
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// The summed RSS and PSS (KiB) of every virtiofsd process now running and how many there are
/// (one VM runs at a time here; virtiofsd's namespace sandbox is two processes per VM).
fn virtiofsd_memory() -> (u64, u64, usize) {
    let (mut rss, mut pss, mut n) = (0, 0, 0);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0, 0);
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let is_virtiofsd = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "virtiofsd");
        if !is_virtiofsd {
            continue;
        }
        if let Some((r, p)) = std::fs::read_to_string(path.join("smaps_rollup"))
            .ok()
            .and_then(|s| parse_rss_pss(&s))
        {
            rss += r;
            pss += p;
            n += 1;
        }
    }
    (rss, pss, n)
}

/// A fresh pair of directories for one run: `src` holding `read.bin` (written now, then the
/// host's page cache dropped), and `data`, not yet created (`-v` creates it, owned by the
/// container's root, as it would for a user).
fn prepare_dirs(root: &Path, mib: u32) -> Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(root);
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    // virtiofsd reads as an unprivileged id: the path down to the share must be searchable.
    for dir in [root, &src] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut bytes = Vec::with_capacity(chunk.len() * mib as usize);
    for _ in 0..mib {
        bytes.extend_from_slice(&chunk);
    }
    std::fs::write(src.join("read.bin"), bytes)?;
    std::fs::set_permissions(src.join("read.bin"), std::fs::Permissions::from_mode(0o644))?;
    // Best effort: only root may drop caches, and a tmpfs keeps its pages anyway.
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    Ok((src, root.join("data")))
}

/// Runs `cmd` (which prints the workload's phases) while sampling virtiofsd's memory; returns
/// the phases and the largest (RSS, PSS) sum seen, in KiB.
fn timed_run(mut cmd: Command, what: &str) -> Result<(Vec<Phase>, (u64, u64, usize))> {
    let done = AtomicBool::new(false);
    let (out, peak) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = (0, 0, 0);
            while !done.load(Ordering::Relaxed) {
                let now = virtiofsd_memory();
                if now.1 > peak.1 {
                    peak = now;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peak
        });
        let out = cmd.stdin(Stdio::null()).output();
        done.store(true, Ordering::Relaxed);
        (out, sampler.join().expect("sampler thread"))
    });
    let out = out.with_context(|| format!("start {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let phases = parse_phases(&stdout);
    if phases.len() != 4 {
        bail!("{what}: expected 4 phase lines, got: {stdout}");
    }
    Ok((phases, peak))
}

pub(super) fn fs_bench(runs: usize, debug_build: bool, args: &FsArgs) -> Result<()> {
    ensure_debs(&["busybox-static", "e2fsprogs", "crun", "runc"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let agent = crate::agent::build()?;
    let virtiofsd = crate::virtiofsd::build()?;
    let bin_dir = super::build_microvm(debug_build)?;
    let work = tempfile::Builder::new().prefix("bench-fs-").tempdir()?;
    let layout = crate::demo::busybox_oci_layout(&work.path().join("busybox-oci"), &[])?;
    super::run_inner(
        &[
            "fs",
            "--runs",
            &runs.to_string(),
            "--file-mib",
            &args.file_mib.to_string(),
            "--files",
            &args.files.to_string(),
        ],
        &[
            ("MICROVM_KERNEL", vmlinux.into_os_string()),
            ("MICROVM_AGENT", agent.into_os_string()),
            ("MICROVM_VIRTIOFSD", virtiofsd.into_os_string()),
            ("BENCH_MICROVM", bin_dir.join("microvm").into_os_string()),
            ("BENCH_LAYOUT", layout.into_os_string()),
        ],
    )
}

/// A runc (else crun) bundle on a busybox root filesystem running the workload with `src` bound
/// read-only at `/src` and `data` read-write at `/data`; returns the runtime's name.
fn oci_bundle(bundle: &Path, script: &str, src: &Path, data: &Path) -> Result<&'static str> {
    crate::demo::busybox_rootfs(&bundle.join("rootfs"))?;
    for runtime in ["runc", "crun"] {
        let _ = std::fs::remove_file(bundle.join("config.json"));
        let spec = Command::new(runtime)
            .arg("spec")
            .current_dir(bundle)
            .status();
        if !matches!(spec, Ok(s) if s.success()) {
            continue;
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json"))?)?;
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = serde_json::json!(["sh", "-c", script]);
        config["mounts"]
            .as_array_mut()
            .context("config.json without mounts")?
            .extend([
                serde_json::json!({"destination": "/src", "type": "bind",
                    "source": src, "options": ["rbind", "ro"]}),
                serde_json::json!({"destination": "/data", "type": "bind",
                    "source": data, "options": ["rbind", "rw"]}),
            ]);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        return Ok(runtime);
    }
    bail!("neither runc nor crun is available")
}

pub(super) fn fs_inner(runs: usize, args: &FsArgs) -> Result<()> {
    let microvm = PathBuf::from(std::env::var_os("BENCH_MICROVM").context("BENCH_MICROVM")?);
    let layout = PathBuf::from(std::env::var_os("BENCH_LAYOUT").context("BENCH_LAYOUT")?);
    let work = tempfile::Builder::new().prefix("bench-fs-").tempdir()?;
    let script = workload(args);
    let home = work.path().join("home");
    let dirs = work.path().join("dirs");
    let bundle = work.path().join("bundle");
    let mut vm_runs = Vec::new();
    let mut oci_runs = Vec::new();
    let mut memory = Vec::new();
    let mut runtime = "runc";
    // Alternating, so that a change in the machine's load hits both sides alike.
    for i in 0..runs {
        let (src, data) = prepare_dirs(&dirs, args.file_mib)?;
        let mut cmd = Command::new(&microvm);
        cmd.args(["run", "--rm", "-v"])
            .arg(format!("{}:/src:ro", src.display()))
            .arg("-v")
            .arg(format!("{}:/data", data.display()))
            .arg(&layout)
            .args(["sh", "-c", &script])
            .env("MICROVM_HOME", &home);
        let (phases, peak) = timed_run(cmd, "microvm run -v")?;
        if peak.2 == 0 {
            bail!("no virtiofsd process was seen while `microvm run -v` ran");
        }
        vm_runs.push(phases);
        memory.push(peak);

        let (src, data) = prepare_dirs(&dirs, args.file_mib)?;
        std::fs::create_dir(&data)?;
        runtime = oci_bundle(&bundle, &script, &src, &data)?;
        let mut cmd = Command::new(runtime);
        cmd.args(["run", "-b"])
            .arg(&bundle)
            .arg(format!("bench-fs-{i}"));
        oci_runs.push(timed_run(cmd, runtime)?.0);
    }
    print_report(runs, args, runtime, &vm_runs, &oci_runs, &memory);
    Ok(())
}

/// The median rate of each phase over the runs.
fn median_rates(runs: &[Vec<Phase>]) -> Vec<(String, String, Option<f64>)> {
    runs[0]
        .iter()
        .map(|phase| {
            let rates: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.iter().find(|p| p.name == phase.name)?.rate())
                .collect();
            let rate = (!rates.is_empty()).then(|| median(&rates));
            (phase.name.clone(), format!("{}/s", phase.unit), rate)
        })
        .collect()
}

fn print_report(
    runs: usize,
    args: &FsArgs,
    runtime: &str,
    vm_runs: &[Vec<Phase>],
    oci_runs: &[Vec<Phase>],
    memory: &[(u64, u64, usize)],
) {
    println!(
        "== file I/O on a shared directory: `microvm run -v` (virtio-fs) vs `{runtime} run` with \
         a bind mount; {} MiB file, {} small files, medians of {runs} runs ==",
        args.file_mib, args.files
    );
    println!(
        "(under TCG emulation, roughly 100x slower than hardware: only the ratios mean something)"
    );
    println!(
        "{:<8} {:>18} {:>18} {:>14}",
        "phase",
        "microvm -v",
        format!("{runtime} bind"),
        format!("microvm/{runtime}")
    );
    let show = |r: Option<f64>, unit: &str| match r {
        Some(r) => format!("{r:.1} {unit}"),
        None => "below clock".into(),
    };
    for ((name, unit, vm), (_, _, oci)) in median_rates(vm_runs)
        .into_iter()
        .zip(median_rates(oci_runs))
    {
        let ratio = match (vm, oci) {
            (Some(v), Some(o)) => format!("{:.2}", v / o),
            _ => "-".into(),
        };
        println!(
            "{name:<8} {:>18} {:>18} {ratio:>14}",
            show(vm, &unit),
            show(oci, &unit)
        );
    }
    let rss: Vec<f64> = memory.iter().map(|m| m.0 as f64 / 1024.0).collect();
    let pss: Vec<f64> = memory.iter().map(|m| m.1 as f64 / 1024.0).collect();
    let processes = memory.iter().map(|m| m.2).max().unwrap_or(0);
    println!(
        "virtiofsd per VM while the workload ran (summed over its {processes} process(es), \
         peak sample per run, medians): RSS {:.1} MiB, PSS {:.1} MiB",
        median(&rss),
        median(&pss)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_parsed_from_the_workload_output() {
        let out = "noise\nfsbench: write 16 MiB in 2340 ms\r\nfsbench: read 16 MiB in 800 ms\n\
                   fsbench: create 500 files in 0 ms\nfsbench: garbled line\n";
        let phases = parse_phases(out);
        assert_eq!(
            phases,
            vec![
                Phase {
                    name: "write".into(),
                    amount: 16.0,
                    unit: "MiB".into(),
                    ms: 2340.0
                },
                Phase {
                    name: "read".into(),
                    amount: 16.0,
                    unit: "MiB".into(),
                    ms: 800.0
                },
                Phase {
                    name: "create".into(),
                    amount: 500.0,
                    unit: "files".into(),
                    ms: 0.0
                },
            ]
        );
        assert_eq!(phases[0].rate(), Some(16.0 / 2.34));
        assert_eq!(phases[2].rate(), None);
    }

    #[test]
    fn the_workload_reports_each_phase_in_the_parsed_format() {
        // The script runs under the host's sh here, against a temporary /data stand-in: the
        // lines it prints are the ones parse_phases reads.
        let dir = tempfile::tempdir().unwrap();
        let args = FsArgs {
            file_mib: 1,
            files: 3,
        };
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/read.bin"), vec![7u8; 1 << 20]).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let script = workload(&args)
            .replace("/data", &dir.path().join("data").display().to_string())
            .replace("/src", &dir.path().join("src").display().to_string());
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let phases = parse_phases(&String::from_utf8_lossy(&out.stdout));
        let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["write", "read", "create", "stat"]);
        assert_eq!(phases[0].amount, 1.0);
        assert_eq!(phases[3].amount, 3.0);
        assert!(phases.iter().all(|p| p.ms >= 0.0));
        assert_eq!(
            std::fs::read_dir(dir.path().join("data/small"))
                .unwrap()
                .count(),
            3
        );
    }

    #[test]
    fn rss_and_pss_come_from_smaps_rollup() {
        let rollup = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0 [rollup]\n\
                      Rss:                3412 kB\nPss:                1210 kB\n\
                      Pss_Anon:            900 kB\n";
        assert_eq!(parse_rss_pss(rollup), Some((3412, 1210)));
        assert_eq!(parse_rss_pss("Rss: 1 kB\n"), None);
    }
}
