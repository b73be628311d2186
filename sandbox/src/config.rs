//! What a sandbox, a container and a process are made from.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agent_protocol::agent as pb;
use vmm_api::{KernelParam, NetConfig};

use crate::{Error, Result, SharedDir};

/// A disk for the guest (`/dev/vda`, `/dev/vdb`, ... in order): the VMM contract's own type.
/// Its `rate_limit` ([`DiskRateLimit`]) caps the guest's bandwidth and operations on it.
pub use vmm_api::DiskConfig as Disk;
pub use vmm_api::{RateLimitConfig as DiskRateLimit, TokenBucketConfig};

/// Where the VMM's output (the guest's serial console and the VMM's own log) goes.
#[derive(Debug, Clone)]
pub enum Console {
    Null,
    Inherit,
    /// Appended to this file.
    File(PathBuf),
}

impl Console {
    /// Opens (creating it 0600, whatever the umask: the guest's console can hold secrets) the
    /// file a [`Console::File`] appends to. A symlink at `path` is refused, not followed: whoever
    /// can write the directory must not get a root process to append guest output to a file of
    /// their choosing. `microvm`'s run logs are opened here too.
    pub fn open_file(path: &Path) -> Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))
    }

    /// Sends a child process's stdout and stderr where this console goes.
    pub(crate) fn redirect(&self, cmd: &mut Command) -> Result<()> {
        match self {
            Console::Null => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
            Console::Inherit => {}
            Console::File(path) => {
                let f = Self::open_file(path)?;
                let f2 = f
                    .try_clone()
                    .map_err(|e| Error::io("dup the console file", e))?;
                cmd.stdout(f).stderr(f2);
            }
        }
        Ok(())
    }
}

/// How to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The VMM binary, `microvm-vmm` ([`crate::locate::vmm`] finds it).
    pub vmm: PathBuf,
    /// The guest kernel (vmlinux or bzImage).
    pub kernel: PathBuf,
    /// The static `microvm-agent` binary; it becomes the initramfs's `/init`.
    pub agent: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    /// Added to the guest command line after its defaults ([`vmm_api::DEFAULT_CMDLINE`]);
    /// `RUST_LOG=<filter>` sets the agent's log level.
    pub kernel_params: Vec<KernelParam>,
    /// A virtio-rng device (the guest's entropy source).
    pub rng: bool,
    pub console: Console,
    /// Where the vsock socket and the initramfs go; `None`: a temporary directory, removed
    /// when the sandbox is dropped. Unix socket paths must stay under 108 bytes.
    pub state_dir: Option<PathBuf>,
    /// How long [`Sandbox::start`] waits for the agent.
    pub start_timeout: Duration,
    /// The host-side deadline of each RPC except `WaitProcess` and `GetOomEvent` (which wait
    /// as long as it takes).
    pub rpc_timeout: Duration,
    /// The guest's vsock context id.
    pub guest_cid: u32,
    /// Host directories shared live into the guest (virtio-fs, one virtiofsd for all of them):
    /// the guest mounts [`crate::share::guest_mount`] and finds directory `i` at
    /// [`crate::share::guest_path`]`(i)`.
    pub shares: Vec<SharedDir>,
    /// One live share instead of `shares`: the daemon serves [`crate::share::share_root`] of
    /// `state_dir`, which the caller made a shared mount, and sees what the caller mounts under
    /// it while the VM runs (the containerd shim's pod volumes; see [`crate::share`]).
    pub live_share: bool,
    /// The virtio-fs daemon; `None`: [`crate::locate::virtiofsd`].
    pub virtiofsd: Option<PathBuf>,
    /// virtio-net devices (eth0, eth1, ... in order) on host taps, which the VMM opens by name
    /// in its own network namespace (or creates there).
    pub nets: Vec<NetConfig>,
    /// The network namespace the VMM runs in (an nsfs path such as `/var/run/netns/NAME`),
    /// where it opens the `nets` taps; `None`: the caller's. virtiofsd stays in the caller's.
    pub netns: Option<PathBuf>,
    /// Jail the VMM ([`crate::jail::VmJail`]: its own namespaces, an empty root, a per-VM
    /// unprivileged uid/gid, no capabilities, a cgroup leaf). Needs root; on by default.
    pub jail: bool,
    /// The cgroup (below `/sys/fs/cgroup`, `/`-separated plain names) the jailed VM's leaf is
    /// made in: a pod's cgroup parent, so the pod's cgroup counts the VM (containerd's
    /// PodSandboxStats reads it). `None`: [`jail::cgroup::GROUP`].
    pub cgroup_parent: Option<String>,
}

impl SandboxConfig {
    pub fn new(
        vmm: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        agent: impl Into<PathBuf>,
    ) -> Self {
        Self {
            vmm: vmm.into(),
            kernel: kernel.into(),
            agent: agent.into(),
            cpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            kernel_params: Vec::new(),
            rng: true,
            console: Console::Null,
            state_dir: None,
            start_timeout: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(60),
            guest_cid: 3,
            shares: Vec::new(),
            live_share: false,
            virtiofsd: None,
            nets: Vec::new(),
            netns: None,
            jail: true,
            cgroup_parent: None,
        }
    }
}

/// Guest-wide settings ([`Sandbox::create_sandbox`]).
#[derive(Debug, Clone, Default)]
pub struct SandboxSettings {
    pub hostname: String,
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    pub dns_options: Vec<String>,
    pub sysctls: BTreeMap<String, String>,
    /// Guest mounts (absolute guest destinations).
    pub mounts: Vec<Mount>,
    /// Containers created afterwards share one PID namespace (Kubernetes'
    /// `shareProcessNamespace`): they see each other's processes.
    pub share_pid_namespace: bool,
    /// Containers created afterwards share one IPC namespace (Kubernetes always does this
    /// within a pod): SysV IPC and POSIX message queues are common to them.
    pub share_ipc_namespace: bool,
    /// The guest's `/etc/hosts`, as given (empty: not written).
    pub hosts: String,
}

/// A filesystem the agent mounts (see agent.proto's `Mount`).
#[derive(Debug, Clone, Default)]
pub struct Mount {
    pub source: String,
    pub destination: String,
    pub fstype: String,
    pub options: Vec<String>,
}

impl Mount {
    pub(crate) fn to_pb(&self) -> pb::Mount {
        pb::Mount {
            source: self.source.clone(),
            destination: self.destination.clone(),
            fstype: self.fstype.clone(),
            options: self.options.clone(),
            ..Default::default()
        }
    }
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone)]
pub enum RootfsSource {
    /// A guest block device ("/dev/vda") with its filesystem type.
    Block {
        path: String,
        fstype: String,
        options: Vec<String>,
    },
    /// A guest directory (for example on a [`SandboxSettings`] mount).
    Directory(String),
}

#[derive(Debug, Clone)]
pub struct Rootfs {
    pub source: RootfsSource,
    /// A tmpfs-backed overlay on top, so the container can write.
    pub writable: bool,
}

/// A container to create.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub id: String,
    /// The OCI runtime spec (config.json) as JSON.
    pub spec_json: Vec<u8>,
    pub rootfs: Rootfs,
    /// Mounted inside the rootfs (destinations are container paths).
    pub mounts: Vec<Mount>,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// A process's stdio on the host: descriptors the sandbox reads (stdin) or writes (stdout,
/// stderr); `None` is /dev/null for the process. With `terminal`, the process gets a pty in the
/// guest: stdin feeds it, stdout gets its output, and stderr must be `None`.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub terminal: Option<WindowSize>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128+N for a signal N (127/126: the executable was missing or not
    /// executable).
    pub code: i32,
    /// When the agent saw it (Unix time in ms, guest clock).
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_console_file_is_private_appended_to_and_never_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::io::Write::write_all(&mut Console::open_file(&log).unwrap(), b"one\n").unwrap();
        std::io::Write::write_all(&mut Console::open_file(&log).unwrap(), b"two\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "one\ntwo\n");
        assert_eq!(
            fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A symlink planted where the log goes is refused; its target stays as it was.
        let target = dir.path().join("elsewhere");
        fs::write(&target, "untouched").unwrap();
        let planted = dir.path().join("planted.log");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        let err = Console::open_file(&planted).unwrap_err();
        assert!(err.to_string().contains("planted.log"), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
    }
}
