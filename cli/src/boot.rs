//! `microvm boot`: the VMM's own front end, which boots a kernel directly.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct BootArgs {
    /// Kernel image: an ELF vmlinux (PVH entry if present) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (for example a gzipped cpio archive).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line; virtio-mmio device entries are appended to it.
    #[arg(long, default_value = vmm::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// A virtio block device backed by a file: PATH or PATH,ro. Repeatable; the guest sees
    /// them as /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
    disks: Vec<vmm::DiskConfig>,
    /// A virtio-vsock device: CID,UDS_PATH. The host connects to UDS_PATH and writes
    /// "CONNECT <port>\n"; guest connections to host port P reach a listener at UDS_PATH_P.
    #[arg(long, value_name = "CID,UDS_PATH", value_parser = parse_vsock)]
    vsock: Option<vmm::VsockConfig>,
    /// A virtio-rng device fed by the host's getrandom(2).
    #[arg(long)]
    rng: bool,
    /// A virtio-net device on host tap TAP (created if missing). Default MAC: 02:00 and four
    /// bytes derived from the tap name; default MTU 1500. Repeatable: eth0, eth1, ...
    #[arg(long = "net", value_name = "TAP[,mac=XX:XX:XX:XX:XX:XX][,mtu=N]", value_parser = |s: &str| s.parse::<vmm::NetConfig>())]
    nets: Vec<vmm::NetConfig>,
    /// A virtio-fs device served by the vhost-user daemon (virtiofsd) listening on SOCKET; the
    /// guest mounts it with `mount -t virtiofs TAG DIR`. Repeatable.
    #[arg(long = "fs", value_name = "TAG,SOCKET", value_parser = parse_fs)]
    fs: Vec<vmm::FsConfig>,
    /// Boot even on a host whose KVM cannot run an unmodified guest kernel (for PVM guest
    /// kernels).
    #[arg(long)]
    force: bool,
}

fn parse_disk(s: &str) -> Result<vmm::DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, opt)) => return Err(format!("unknown disk option {opt:?} (use ro or rw)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(vmm::DiskConfig {
        path: path.into(),
        read_only,
    })
}

fn parse_vsock(s: &str) -> Result<vmm::VsockConfig, String> {
    let (cid, path) = s
        .split_once(',')
        .ok_or_else(|| "expected CID,UDS_PATH".to_string())?;
    let guest_cid: u64 = cid.parse().map_err(|_| format!("bad CID {cid:?}"))?;
    if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
        return Err(format!("guest CID must be 3 to 2^32-2, not {guest_cid}"));
    }
    Ok(vmm::VsockConfig {
        guest_cid,
        uds_path: path.into(),
    })
}

fn parse_fs(s: &str) -> Result<vmm::FsConfig, String> {
    let (tag, socket) = s
        .split_once(',')
        .ok_or_else(|| "expected TAG,SOCKET".to_string())?;
    if tag.is_empty() || tag.len() > vmm::devices::virtio::fs::TAG_MAX_LEN || socket.is_empty() {
        return Err(format!(
            "expected TAG,SOCKET with a tag of 1 to 36 bytes, not {s:?}"
        ));
    }
    Ok(vmm::FsConfig {
        tag: tag.into(),
        socket: socket.into(),
    })
}

pub fn boot(args: BootArgs) -> Result<i32> {
    if !args.force {
        vmm::host::check_can_boot_guests()?;
    }
    if !args.kernel.is_file() {
        bail!(
            "kernel {} does not exist or is not a file",
            args.kernel.display()
        );
    }
    let config = vmm::VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory,
        disks: args.disks,
        vsock: args.vsock,
        rng: args.rng,
        nets: args.nets,
        fs: args.fs,
        console: Box::new(std::io::stdout()),
    };
    vmm::run(config).context("cannot run the VM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disk("/a/b.img,ro").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/a/b.img"), true));
        assert!(!parse_disk("/a/b.img").unwrap().read_only);
        assert!(!parse_disk("x,rw").unwrap().read_only);
        assert!(parse_disk("x,rx").is_err());
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn fs_options() {
        let f = parse_fs("microvm,/run/x/virtiofs.sock").unwrap();
        assert_eq!(
            (f.tag.as_str(), f.socket),
            ("microvm", PathBuf::from("/run/x/virtiofs.sock"))
        );
        assert!(parse_fs("microvm").is_err());
        assert!(parse_fs(",/x").is_err());
        assert!(parse_fs(&format!("{},/x", "t".repeat(37))).is_err());
    }

    #[test]
    fn vsock_options() {
        let v = parse_vsock("3,/tmp/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/tmp/v.sock")));
        assert!(parse_vsock("2,/tmp/v").is_err(), "CID 2 is the host");
        assert!(parse_vsock("abc,/tmp/v").is_err());
        assert!(parse_vsock("3").is_err());
    }
}
