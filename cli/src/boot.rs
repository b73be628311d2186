//! `microvm boot`: booting a kernel directly, for people. A thin wrapper: it turns its flags into
//! the VMM's typed config ([`vmm_api::VmConfig`]) and runs `microvm-vmm` with it on descriptor
//! 3, so the console, the log and the exit status are the VMM's own. By default the VMM is
//! jailed ([`sandbox::jail::VmJail`]): `microvm boot` holds the VM's ids and cgroup leaf while
//! it runs and releases them after; with `--no-jail` it execs the VMM unconfined.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sandbox::vmm_api::{
    self, DiskConfig, FsConfig, KernelCmdline, NetConfig, VmConfig, VsockConfig,
};

#[derive(clap::Args)]
pub struct BootArgs {
    /// Kernel image: an ELF vmlinux (PVH entry if present) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (for example a gzipped cpio archive).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default "console=ttyS0 reboot=k panic=-1 pci=off
    /// quiet"; virtio-mmio device entries are appended to it.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = vmm_api::DEFAULT_VCPUS)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vmm_api::DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// A virtio block device backed by a file: PATH or PATH,ro. Repeatable; the guest sees
    /// them as /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// Rate-limit every disk: bytes=N per second (512k, 10m, 1g) and/or ops=N requests per
    /// second, e.g. bytes=10m,ops=500.
    #[arg(long = "disk-rate", value_name = "bytes=N,ops=N", value_parser = crate::run::parse_disk_rate)]
    disk_rate: Option<vmm_api::RateLimitConfig>,
    /// A virtio-vsock device: CID,UDS_PATH. The host connects to UDS_PATH and writes
    /// "CONNECT <port>\n"; guest connections to host port P reach a listener at UDS_PATH_P.
    #[arg(long, value_name = "CID,UDS_PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// A virtio-rng device fed by the host's getrandom(2).
    #[arg(long)]
    rng: bool,
    /// A virtio-net device on host tap TAP (created if missing). Default MAC: 02:00 and four
    /// bytes derived from the tap name; default MTU 1500. Repeatable: eth0, eth1, ...
    #[arg(long = "net", value_name = "TAP[,mac=XX:XX:XX:XX:XX:XX][,mtu=N]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A virtio-fs device served by the vhost-user daemon (virtiofsd) listening on SOCKET; the
    /// guest mounts it with `mount -t virtiofs TAG DIR`. Repeatable.
    #[arg(long = "fs", value_name = "TAG,SOCKET", value_parser = parse_fs)]
    fs: Vec<FsConfig>,
    /// Boot even on a host whose KVM cannot run an unmodified guest kernel (for PVM guest
    /// kernels).
    #[arg(long)]
    force: bool,
    /// Run the VMM unconfined (as this user, in this process's namespaces); by default it is
    /// jailed, which needs root. A host listener for guest connections (UDS_PATH_P) must then
    /// be reachable by the VM's jail uid: its directory searchable, the socket writable.
    #[arg(long)]
    no_jail: bool,
}

/// `path` made absolute against this directory (the contract takes absolute paths only).
fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, opt)) => return Err(format!("unknown disk option {opt:?} (use ro or rw)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(DiskConfig {
        path: absolute(Path::new(path))?,
        read_only,
        rate_limit: None,
    })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let net: NetConfig = s.parse()?;
    net.validate().map_err(|e| e.to_string())?;
    Ok(net)
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (cid, path) = s
        .split_once(',')
        .ok_or_else(|| "expected CID,UDS_PATH".to_string())?;
    let vsock = VsockConfig {
        guest_cid: cid.parse().map_err(|_| format!("bad CID {cid:?}"))?,
        uds_path: absolute(Path::new(path))?,
    };
    vsock.validate().map_err(|e| e.to_string())?;
    Ok(vsock)
}

fn parse_fs(s: &str) -> Result<FsConfig, String> {
    let (tag, socket) = s
        .split_once(',')
        .ok_or_else(|| "expected TAG,SOCKET".to_string())?;
    if socket.is_empty() {
        return Err(format!("expected TAG,SOCKET, not {s:?}"));
    }
    let fs = FsConfig {
        tag: tag.into(),
        socket: absolute(Path::new(socket))?,
    };
    fs.validate().map_err(|e| e.to_string())?;
    Ok(fs)
}

/// The VMM's config for these flags.
fn vm_config(args: &BootArgs) -> Result<VmConfig> {
    let config = VmConfig {
        kernel: absolute(&args.kernel).map_err(|e| anyhow!(e))?,
        initrd: match &args.initrd {
            Some(p) => Some(absolute(p).map_err(|e| anyhow!(e))?),
            None => None,
        },
        cmdline: KernelCmdline {
            base: args.cmdline.clone(),
            params: Vec::new(),
        },
        vcpus: args.cpus,
        memory_mib: args.memory,
        disks: args
            .disks
            .iter()
            .map(|d| DiskConfig {
                rate_limit: args.disk_rate,
                ..d.clone()
            })
            .collect(),
        vsock: args.vsock.clone(),
        rng: args.rng,
        nets: args.nets.clone(),
        fs: args.fs.clone(),
        force: args.force,
        seccomp: Default::default(),
        jail: None,
    };
    config.validate().context("invalid VM configuration")?;
    Ok(config)
}

/// Runs `microvm-vmm` (found next to `microvm`, or `$MICROVM_VMM`) jailed and returns its exit
/// status (128 + N for a signal N); with `--no-jail`, replaces this process with it.
pub fn boot(args: BootArgs) -> Result<i32> {
    let mut config = vm_config(&args)?;
    let vmm = sandbox::locate::vmm()?;
    if args.no_jail {
        let err = sandbox::vmm_command(&vmm, &config)?.exec();
        return Err(err).with_context(|| format!("cannot run {}", vmm.display()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("jailing the VMM needs root: run as root, or pass --no-jail");
    }
    // A host that cannot boot guests is refused before the jail takes ids and a cgroup leaf
    // (one line; with `--force` the VMM skips the check too).
    if !config.force {
        if let Err(e) = vmm::host::check_can_boot_guests() {
            return Err(crate::ExitError::new(1, e.to_string()).into());
        }
    }
    let jail = sandbox::jail::VmJail::prepare(&mut config, None)?;
    let mut cmd = sandbox::vmm_command(&vmm, &config)?;
    // This process is one thread, so the signal fires exactly when it dies: killing `microvm
    // boot` still ends the VM, as it did when this process was the VMM (the jail's supervisor
    // keeps the signal across its identity change).
    // SAFETY: the closure only calls prctl(2), async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", vmm.display()))?;
    // As system(3) does: a terminal's Ctrl-C or Ctrl-\ reaches the VMM (same process group),
    // which ends; this process stays to release the jail. Set after the spawn, so the VMM
    // keeps the default dispositions.
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let status = child.wait().context("wait for the VMM")?;
    drop(jail);
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disk("/a/b.img,ro").unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/a/b.img"), true));
        assert!(!parse_disk("/a/b.img").unwrap().read_only);
        assert!(!parse_disk("/x,rw").unwrap().read_only);
        assert!(parse_disk("x,rx").is_err());
        assert!(parse_disk(",ro").is_err());
        let relative = parse_disk("b.img").unwrap();
        assert_eq!(
            relative.path,
            std::env::current_dir().unwrap().join("b.img")
        );
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
        let err = parse_vsock("2,/tmp/v").unwrap_err();
        assert!(
            err.contains("guest_cid must be 3 to"),
            "CID 2 is the host: {err}"
        );
        assert!(parse_vsock("abc,/tmp/v").is_err());
        assert!(parse_vsock("3").is_err());
    }

    #[test]
    fn flags_become_the_typed_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            boot: BootArgs,
        }
        let cli = Cli::try_parse_from([
            "boot",
            "--kernel",
            "/k",
            "--cpus",
            "2",
            "--memory",
            "256",
            "--disk",
            "/d,ro",
            "--vsock",
            "5,/s",
            "--rng",
            "--force",
            "--net",
            "tap0,mtu=1400",
        ])
        .unwrap();
        let c = vm_config(&cli.boot).unwrap();
        assert_eq!(
            (c.vcpus, c.memory_mib, c.rng, c.force),
            (2, 256, true, true)
        );
        assert_eq!(c.cmdline.render(), vmm_api::DEFAULT_CMDLINE);
        assert_eq!(
            c.disks,
            vec![DiskConfig {
                path: "/d".into(),
                read_only: true,
                rate_limit: None,
            }]
        );
        assert_eq!(c.vsock.unwrap().guest_cid, 5);
        assert_eq!((c.nets[0].tap_name.as_str(), c.nets[0].mtu), ("tap0", 1400));
        assert!(Cli::try_parse_from(["boot", "--kernel", "/k", "--net", "a/b"]).is_err());

        let cli =
            Cli::try_parse_from(["boot", "--kernel", "/k", "--cmdline", "console=hvc0"]).unwrap();
        let c = vm_config(&cli.boot).unwrap();
        assert_eq!(c.cmdline.render(), "console=hvc0");
        assert_eq!((c.vcpus, c.memory_mib), (1, 128));

        let cli = Cli::try_parse_from(["boot", "--kernel", "/k", "--cpus", "0"]).unwrap();
        let err = format!("{:#}", vm_config(&cli.boot).unwrap_err());
        assert!(err.contains("vcpus must be 1 to 32, not 0"), "{err}");
    }
}
