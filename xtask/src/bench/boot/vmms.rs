//! How each VMM of the boot comparison is started: its command for a given guest command line.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{CMDLINE, GUEST_MIB, PHASES_CMDLINE};

/// Builds a VMM's command for a given guest command line.
pub(super) type CommandFor = Box<dyn Fn(&str) -> Result<Command>>;

/// How a VMM is started.
pub(super) struct Vmm {
    pub(super) name: &'static str,
    pub(super) command: CommandFor,
}

/// The command line for a measured boot (`quiet`), a boot that idles a second (`SLEEP=1`, for
/// RSS) or a boot with the kernel's timeline on the console.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Mode {
    Quiet,
    Idle,
    Phases,
}

pub(super) fn cmdline(mode: Mode, reboot: &str) -> String {
    let base = CMDLINE.replace("reboot=k", reboot);
    match mode {
        Mode::Quiet => format!("{base} quiet"),
        Mode::Idle => format!("{base} quiet SLEEP=1"),
        Mode::Phases => format!("{base} {PHASES_CMDLINE}"),
    }
}

pub(super) fn microvm_vmm(
    name: &'static str,
    bin: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
) -> Vmm {
    Vmm {
        name,
        command: Box::new(move |cmdline| {
            let mut c = Command::new(&bin);
            c.args(["boot", "--memory", &GUEST_MIB.to_string(), "--kernel"])
                .arg(&vmlinux)
                .arg("--initrd")
                .arg(&initrd)
                .arg("--cmdline")
                .arg(cmdline);
            Ok(c)
        }),
    }
}

pub(super) fn qemu_vmm(vmlinux: PathBuf, initrd: PathBuf) -> Vmm {
    Vmm {
        name: "qemu -M microvm",
        command: Box::new(move |cmdline| {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-M", "microvm", "-enable-kvm", "-cpu", "host", "-m"])
                .arg(GUEST_MIB.to_string())
                .args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic"])
                .args(["-no-reboot", "-serial", "stdio", "-kernel"])
                .arg(&vmlinux)
                .arg("-initrd")
                .arg(&initrd)
                // No i8042 on QEMU's microvm: reset by triple fault, which -no-reboot ends.
                .arg("-append")
                .arg(cmdline.replace("reboot=k", "reboot=t"));
            Ok(c)
        }),
    }
}

/// Firecracker without its API socket, from a JSON config written next to the initramfs.
pub(super) fn firecracker_vmm(
    bin: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
    dir: PathBuf,
) -> Vmm {
    Vmm {
        name: "firecracker",
        command: Box::new(move |cmdline| {
            let config = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": vmlinux,
                    "initrd_path": initrd,
                    "boot_args": cmdline,
                },
                "drives": [],
                "machine-config": { "vcpu_count": 1, "mem_size_mib": GUEST_MIB },
            });
            let path = dir.join("firecracker.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
            let mut c = Command::new(&bin);
            c.arg("--no-api").arg("--config-file").arg(path);
            Ok(c)
        }),
    }
}

/// `microvm boot` with a virtio-fs device (tag `share`) served by `virtiofsd` on an empty
/// directory: guest memory is then a shared memfd the daemon maps, instead of anonymous memory.
/// A fresh daemon per boot (it serves one VMM and ends when that one disconnects), started and
/// listening before the VMM is spawned, so its start is not in the VMM's figures.
pub(super) fn microvm_fs_vmm(
    bin: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
    virtiofsd: PathBuf,
    dir: PathBuf,
) -> Vmm {
    let plain = microvm_vmm("microvm + virtio-fs (memfd)", bin, vmlinux, initrd);
    Vmm {
        name: plain.name,
        command: Box::new(move |cmdline| {
            let share = dir.join("share");
            std::fs::create_dir_all(&share)?;
            let socket = dir.join("virtiofs.sock");
            let _ = std::fs::remove_file(&socket);
            let mut daemon = Command::new(&virtiofsd)
                .arg(format!("--socket-path={}", socket.display()))
                .arg(format!("--shared-dir={}", share.display()))
                .args(["--sandbox=none", "--log-level=error"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if Instant::now() > deadline || daemon.try_wait()?.is_some() {
                    let _ = daemon.kill();
                    bail!("virtiofsd did not listen on {}", socket.display());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // The jailed VMM connects as the VM's own uid.
            std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            // Reaped when its VMM is gone; ended if no VMM ever came.
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(300);
                while matches!(daemon.try_wait(), Ok(None)) {
                    if Instant::now() > deadline {
                        let _ = daemon.kill();
                        let _ = daemon.wait();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let mut c = (plain.command)(cmdline)?;
            c.arg("--fs").arg(format!("share,{}", socket.display()));
            Ok(c)
        }),
    }
}
