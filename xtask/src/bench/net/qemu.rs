//! `bench net`'s QEMU side: QEMU's own virtio-net (`-M microvm`, virtio-mmio) on a tap in
//! microvm's bridge, booting the same guest kernel with the same vCPUs and memory as the
//! `microvm run` VM, and an initramfs holding the same busybox and iperf3 that serves as the
//! containers do. Once without vhost-net (as microvm's device: the VMM moves the packets) and,
//! where the host has `/dev/vhost-net`, once with it (the host kernel moves them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use initramfs::Initramfs;

use super::{measure, Figures, SERVERS};
use crate::util::run;

/// As the `microvm run` VM of this bench: no `--memory` (its default VM size), `--cpus 2`.
const MEMORY_MIB: u64 = 256;
const VCPUS: u32 = 2;
/// microvm's bridge, made by the `microvm run` before.
const BRIDGE: &str = "microvm0";
/// microvm's conflist, for the bridge's subnet.
const CONFLIST: &str = "/etc/microvm/cni/microvm.conflist";
/// What `/init` prints once the servers are starting, and before that if `eth0` could not be
/// set up.
const READY: &str = "NET-READY";
const FAILED: &str = "NET-FAILED";

/// busybox, iperf3 with its libraries, and `/init`: the guest's address from the kernel
/// command line (the kernel hands `BENCH_IP=...` to init's environment), then the servers.
pub(super) fn initramfs(dir: &Path) -> Result<PathBuf> {
    let init = format!(
        "#!/bin/sh\n\
         /bin/busybox mkdir -p /proc /sys /tmp /dev\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox --install -s /bin\n\
         mount -t sysfs sys /sys\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t devtmpfs dev /dev\n\
         ip link set lo up\n\
         ip addr add $BENCH_IP dev eth0 && ip link set eth0 up || echo {FAILED}\n\
         sh -c '{SERVERS}' &\n\
         echo {READY}\n\
         while :; do sleep 3600; done\n"
    );
    let mut i = Initramfs::new();
    i.busybox()?
        .host_program("usr/bin/iperf3", Path::new("/usr/bin/iperf3"))?
        .file("init", init, 0o755);
    Ok(i.write_file(&dir.join("net-bench.cpio"))?)
}

pub(super) fn has_vhost_net() -> bool {
    let _ = Command::new("modprobe")
        .arg("vhost_net")
        .stderr(Stdio::null())
        .status();
    Path::new("/dev/vhost-net").exists()
}

/// The bridge's subnet's first two octets (a /16, as microvm's conflist has it).
fn bridge_prefix() -> Result<String> {
    let list: serde_json::Value = serde_json::from_slice(
        &std::fs::read(CONFLIST).with_context(|| format!("{CONFLIST} (the microvm run's)"))?,
    )?;
    let subnet = list
        .pointer("/plugins/0/ipam/ranges/0/0/subnet")
        .and_then(|s| s.as_str())
        .context("the bridge's subnet in microvm's conflist")?;
    match subnet.split_once('/') {
        Some((net, "16")) => Ok(net.split('.').take(2).collect::<Vec<_>>().join(".")),
        _ => bail!("microvm's subnet {subnet} is not a /16"),
    }
}

/// QEMU on a fresh tap in [`BRIDGE`], at an address host-local does not reach for in a bench
/// (`.250.250`, `.250.251` with vhost-net).
pub(super) fn side(vmlinux: &Path, initrd: &Path, vhost: bool, secs: usize) -> Result<Figures> {
    let (tap, last) = if vhost {
        ("mvbench-vhost", 251)
    } else {
        ("mvbench-qemu", 250)
    };
    let ip = format!("{}.250.{last}", bridge_prefix()?);
    let _ = Command::new("ip")
        .args(["link", "del", tap])
        .stderr(Stdio::null())
        .status();
    run(Command::new("ip").args(["tuntap", "add", "dev", tap, "mode", "tap"]))?;
    let measured = (|| {
        run(Command::new("ip").args(["link", "set", tap, "master", BRIDGE, "up"]))?;
        let mut qemu = Command::new("qemu-system-x86_64")
            // Without ACPI QEMU names its virtio-mmio devices on the kernel command line, which
            // is how this guest kernel (no ACPI) finds them.
            .args([
                "-M",
                "microvm,acpi=off",
                "-enable-kvm",
                "-cpu",
                "host",
                "-m",
            ])
            .arg(MEMORY_MIB.to_string())
            .arg("-smp")
            .arg(VCPUS.to_string())
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio", "-kernel"])
            .arg(vmlinux)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 reboot=t panic=-1 quiet BENCH_IP={ip}/16"
            ))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={tap},script=no,downscript=no,vhost={}",
                if vhost { "on" } else { "off" }
            ))
            .args(["-device", "virtio-net-device,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let stdout = qemu.stdout.take().context("QEMU's console")?;
        let (ready, ready_rx) = mpsc::channel();
        // Reads the console to its end (QEMU's exit), saying when `/init` got to its servers
        // or failed to set up `eth0`.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(READY) || line.contains(FAILED) {
                    let _ = ready.send(line.contains(READY));
                }
            }
        });
        let r = match ready_rx.recv_timeout(Duration::from_secs(180)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!("QEMU's guest could not set up eth0")),
            Err(_) => Err(anyhow::anyhow!(
                "QEMU's guest did not print {READY} within 180 s"
            )),
        }
        .and_then(|()| {
            println!(
                "QEMU{}: {ip} on {BRIDGE}",
                if vhost { " with vhost-net" } else { "" }
            );
            measure(&ip, secs)
        });
        let _ = qemu.kill();
        let _ = qemu.wait();
        r
    })();
    let _ = Command::new("ip").args(["link", "del", tap]).status();
    measured
}
