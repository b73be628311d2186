//! `bench net`: iperf3 TCP throughput both ways and TCP round-trip latency (one byte there and
//! back on one connection, Nagle off) between the host and a container on microvm's bridge
//! (`microvm0`): a `microvm run` container (virtio-net on a tap joined to CNI's veth) next to a
//! crun container on the same bridge (CNI's bridge plugin, the veth straight into the
//! container's namespace) and QEMU's virtio-net on a tap in the same bridge (`-M microvm`, the
//! same guest kernel, vCPUs and memory, the same iperf3 and busybox in an initramfs; once more
//! with vhost-net where the host has it), same host (inside the testbed where guests cannot
//! boot here). Prints figures, asserts nothing about them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::kernel::{self, KernelArgs};
use crate::util::{ensure_debs, run};

mod qemu;

/// The echo server's port beside iperf3's in every guest and container.
const ECHO_PORT: u16 = 7007;
/// What every guest and container runs: busybox's `nc` handing each connection to `cat` (an
/// echo server), and iperf3's server.
const SERVERS: &str = "nc -ll -p 7007 -e cat & exec /usr/bin/iperf3 -s";
/// Round trips timed on one connection, after [`WARM_UP`] untimed ones.
const ROUND_TRIPS: usize = 2000;
const WARM_UP: usize = 100;

/// The image's and the crun bundle's root filesystem: busybox plus iperf3 with the shared
/// libraries `ldd` names.
fn iperf_rootfs(tree: &Path) -> Result<()> {
    crate::demo::busybox_rootfs(tree)?;
    let iperf = Path::new("/usr/bin/iperf3");
    let ldd = Command::new("ldd").arg(iperf).output()?;
    let mut files = vec![iperf.to_path_buf()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dest = tree.join(f.strip_prefix("/")?);
        std::fs::create_dir_all(dest.parent().context("a file in /")?)?;
        // The real file (ldd names symlinks), under the name the loader looks for.
        std::fs::copy(std::fs::canonicalize(&f)?, &dest)
            .with_context(|| format!("copy {}", f.display()))?;
    }
    Ok(())
}

pub(super) fn net_bench(secs: usize, debug_build: bool) -> Result<()> {
    ensure_debs(&[
        "busybox-static",
        "e2fsprogs",
        "crun",
        "iperf3",
        "containernetworking-plugins",
        "iptables",
        "qemu-system-x86",
    ])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let agent = crate::agent::build()?;
    let bin_dir = super::build_microvm(debug_build)?;
    let work = tempfile::Builder::new().prefix("bench-net-").tempdir()?;
    let rootfs = work.path().join("rootfs");
    iperf_rootfs(&rootfs)?;
    let layout = crate::demo::oci_layout_of(&rootfs, &work.path().join("iperf-oci"), &[])?;
    super::run_inner(
        &["net", "--runs", &secs.to_string()],
        &[
            ("MICROVM_KERNEL", vmlinux.into_os_string()),
            ("MICROVM_AGENT", agent.into_os_string()),
            ("BENCH_MICROVM", bin_dir.join("microvm").into_os_string()),
            ("BENCH_LAYOUT", layout.into_os_string()),
            ("BENCH_ROOTFS", rootfs.into_os_string()),
        ],
    )
}

/// One iperf3 client run against `server` for `secs` seconds (`-R`: the server sends); the
/// receiver's rate in Gbit/s. Retried while the server is still starting.
fn iperf(server: &str, secs: usize, reverse: bool) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut c = Command::new("iperf3");
        c.args(["-c", server, "-J", "-t", &secs.to_string()]);
        if reverse {
            c.arg("-R");
        }
        let out = c.stderr(Stdio::null()).output()?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
        {
            return Ok(bps / 1e9);
        }
        if Instant::now() > deadline {
            bail!(
                "iperf3 -c {server}: {}",
                v.get("error").unwrap_or(&Value::Null)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One side's figures.
struct Figures {
    /// Gbit/s, host to container and container to host.
    to_container: f64,
    to_host: f64,
    /// Each timed round trip, µs, sorted.
    round_trips: Vec<f64>,
}

impl Figures {
    fn percentile(&self, p: f64) -> f64 {
        let i = ((self.round_trips.len() - 1) as f64 * p).round() as usize;
        self.round_trips[i]
    }
}

fn measure(ip: &str, secs: usize) -> Result<Figures> {
    Ok(Figures {
        to_container: iperf(ip, secs, false)?,
        to_host: iperf(ip, secs, true)?,
        round_trips: round_trips(ip)?,
    })
}

/// [`ROUND_TRIPS`] one-byte round trips to the echo server at `ip`, in µs, sorted. Retried
/// while the server is still starting.
fn round_trips(ip: &str) -> Result<Vec<f64>> {
    let addr: SocketAddr = format!("{ip}:{ECHO_PORT}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => bail!("connect to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    let mut byte = [0u8; 1];
    for i in 0..WARM_UP + ROUND_TRIPS {
        let start = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut byte)
            .with_context(|| format!("the echo from {addr}"))?;
        if i >= WARM_UP {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// The microvm side: a detached run serving iperf3 and the echo server on the bridge.
fn microvm_side(microvm: &Path, layout: &Path, home: &Path, secs: usize) -> Result<Figures> {
    let mv = |args: &[&str]| -> Result<String> {
        let out = Command::new(microvm)
            .args(args)
            .env("MICROVM_HOME", home)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "microvm {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let layout = layout.to_str().context("a UTF-8 path")?;
    mv(&[
        "run", "-d", "--name", "iperf", "--cpus", "2", layout, "/bin/sh", "-c", SERVERS,
    ])?;
    let measured = (|| {
        let addr = mv(&["exec", "iperf", "ip", "-4", "-o", "addr", "show", "eth0"])?;
        let ip = addr
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .context("the run's address")?
            .to_string();
        println!("microvm run: {ip} on microvm0");
        measure(&ip, secs)
    })();
    mv(&["rm", "-f", "iperf"])?;
    measured
}

/// Runs CNI plugin `plugin` (its config with the network's name and version) for `command`.
fn cni(list: &Value, plugin: &Value, command: &str, id: &str, netns: &Path) -> Result<Value> {
    let mut config = plugin.clone();
    config["name"] = list["name"].clone();
    config["cniVersion"] = list["cniVersion"].clone();
    let ty = plugin["type"].as_str().context("a plugin type")?;
    let mut child = Command::new(Path::new("/usr/lib/cni").join(ty))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        &serde_json::to_vec(&config)?,
    )?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "CNI {ty} {command}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// The crun side: the same iperf3 in a crun container whose namespace CNI's bridge plugin put
/// on microvm0 (microvm's conflist, its bridge plugin alone).
fn crun_side(rootfs: &Path, work: &Path, secs: usize) -> Result<Figures> {
    let list: Value = serde_json::from_slice(
        &std::fs::read("/etc/microvm/cni/microvm.conflist")
            .context("microvm's conflist (written by the microvm run before)")?,
    )?;
    let bridge = list["plugins"][0].clone();
    let name = "bench-crun";
    let netns = Path::new("/run/netns").join(name);
    run(Command::new("ip").args(["netns", "add", name]))?;
    let measured = (|| {
        let result = cni(&list, &bridge, "ADD", name, &netns)?;
        let ip = result
            .pointer("/ips/0/address")
            .and_then(Value::as_str)
            .and_then(|a| a.split('/').next())
            .context("the bridge plugin's address")?
            .to_string();
        println!("crun: {ip} on microvm0");
        let bundle = work.join("bundle");
        std::fs::create_dir_all(&bundle)?;
        run(Command::new("crun").arg("spec").current_dir(&bundle))?;
        let mut spec: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!(["/bin/sh", "-c", SERVERS]);
        spec["root"] = json!({"path": rootfs, "readonly": true});
        // iperf3 keeps each stream's buffer in a file under /tmp.
        spec["mounts"]
            .as_array_mut()
            .context("mounts")?
            .push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}));
        for ns in spec["linux"]["namespaces"]
            .as_array_mut()
            .context("namespaces")?
        {
            if ns["type"] == "network" {
                ns["path"] = json!(netns);
            }
        }
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)?;
        run(Command::new("crun")
            .args(["run", "-d", "-b"])
            .arg(&bundle)
            .arg(name)
            .stdout(Stdio::null()))?;
        let m = measure(&ip, secs);
        let _ = Command::new("crun").args(["delete", "-f", name]).status();
        m
    })();
    let _ = cni(&list, &bridge, "DEL", name, &netns);
    let _ = Command::new("ip").args(["netns", "del", name]).status();
    measured
}

pub(super) fn net_inner(secs: usize) -> Result<()> {
    let var = |k: &str| -> Result<PathBuf> {
        Ok(PathBuf::from(
            std::env::var_os(k).with_context(|| k.to_string())?,
        ))
    };
    let (microvm, layout, rootfs, vmlinux) = (
        var("BENCH_MICROVM")?,
        var("BENCH_LAYOUT")?,
        var("BENCH_ROOTFS")?,
        var("MICROVM_KERNEL")?,
    );
    let work = tempfile::Builder::new().prefix("bench-net-").tempdir()?;
    println!(
        "== iperf3 TCP, {secs} s per direction, and {ROUND_TRIPS} one-byte TCP round trips, \
         host <-> container over microvm0 =="
    );
    let mut sides = vec![(
        "microvm (virtio-net, tap)",
        microvm_side(&microvm, &layout, &work.path().join("home"), secs)?,
    )];
    sides.push(("crun (veth, no VM)", crun_side(&rootfs, work.path(), secs)?));
    // After the microvm run: it made microvm0, where QEMU's tap goes too.
    let initrd = qemu::initramfs(work.path())?;
    sides.push((
        "QEMU virtio-net (tap)",
        qemu::side(&vmlinux, &initrd, false, secs)?,
    ));
    if qemu::has_vhost_net() {
        sides.push((
            "QEMU virtio-net (tap, vhost-net)",
            qemu::side(&vmlinux, &initrd, true, secs)?,
        ));
    } else {
        println!("no /dev/vhost-net here: QEMU with vhost-net not measured");
    }
    print_table(&sides);
    Ok(())
}

/// A table row: its label, its figure of a side, its unit.
type Row = (&'static str, fn(&Figures) -> f64, &'static str);

/// The figures side by side, each with its ratio to microvm's.
fn print_table(sides: &[(&str, Figures)]) {
    let names: Vec<&str> = sides.iter().map(|(n, _)| *n).collect();
    println!("| | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    let ours = &sides[0].1;
    let rows: [Row; 4] = [
        ("host -> container", |f| f.to_container, "Gbit/s"),
        ("container -> host", |f| f.to_host, "Gbit/s"),
        ("TCP round trip, median", |f| f.percentile(0.5), "µs"),
        ("TCP round trip, p99", |f| f.percentile(0.99), "µs"),
    ];
    for (label, figure, unit) in rows {
        let cells: Vec<String> = sides
            .iter()
            .enumerate()
            .map(|(i, (_, f))| {
                let v = figure(f);
                let precision = if unit == "µs" { 0 } else { 2 };
                if i == 0 {
                    format!("{v:.precision$} {unit}")
                } else {
                    format!("{v:.precision$} {unit} (microvm {:.2}×)", figure(ours) / v)
                }
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
}
