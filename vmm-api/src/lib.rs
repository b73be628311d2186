//! The contract between microvm's VMM (`microvm-vmm`) and the programs that start it: the whole
//! VM configuration as one typed, serde-serialised value.
//!
//! The sandbox (and `microvm boot`, for people) builds a [`VmConfig`], checks it with
//! [`VmConfig::validate`] and hands its JSON to the VMM through an inherited descriptor; the VMM
//! reads it back with [`VmConfig::from_reader`], which caps the size, refuses unknown fields and
//! validates again. Nothing else crosses between the two: no configuration in argv strings.
//!
//! Every limit lives here ([`MAX_VCPUS`], [`MIN_MEMORY_MIB`], [`MAX_DISKS`], ...), and so do the
//! guest command line's defaults ([`DEFAULT_CMDLINE`]), which a [`KernelCmdline`] composes with
//! typed additions.

mod cmdline;
mod jail;
mod net;
mod rate_limit;
mod validate;

use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use cmdline::{KernelCmdline, KernelParam, DEFAULT_CMDLINE, MAX_CMDLINE_BYTES};
pub use jail::{JailConfig, CGROUP_ROOT};
pub use rate_limit::{RateLimitConfig, TokenBucketConfig, MAX_REFILL_TIME_MS};
pub use validate::{
    ConfigError, MAX_CONFIG_BYTES, MAX_DISKS, MAX_FS_TAG_BYTES, MAX_MEMORY_MIB, MAX_PATH_BYTES,
    MAX_UDS_PATH_BYTES, MAX_VCPUS, MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB,
};

/// vCPUs when the config names none.
pub const DEFAULT_VCPUS: u8 = 1;
/// Guest memory (MiB) when the config names none.
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// Everything the VMM needs to boot a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The guest kernel: an ELF vmlinux (PVH entry if present) or a bzImage. Absolute.
    pub kernel: PathBuf,
    /// An initial ramdisk (for example a cpio archive). Absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The guest command line; the VMM appends one `virtio_mmio.device=` entry per device.
    #[serde(default)]
    pub cmdline: KernelCmdline,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,

    // Devices. The VMM attaches them in this order, so the guest's names are stable: every
    // disk (vda, vdb, ...), then vsock, then rng, then every net device (eth0, eth1, ...), then
    // every virtio-fs device. A new kind of device is one more field here, its type in this
    // file, its checks in `validate.rs` and its share of `MAX_VIRTIO_DEVICES` in
    // `VmConfig::virtio_devices`.
    /// virtio-blk devices backed by host files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// A virtio-vsock device (Firecracker's hybrid vsock: a host unix socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng device fed by the host's getrandom(2).
    #[serde(default)]
    pub rng: bool,
    /// virtio-net devices on host taps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// virtio-fs devices served by vhost-user daemons; with any, guest memory is a shared memfd
    /// the daemons map too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,

    /// Boot even on a host whose KVM cannot run an unmodified guest kernel at usable speed
    /// (PVM-only hosts), for PVM guest kernels and for measuring setup there. Without it the
    /// VMM refuses such a host at once with one line.
    #[serde(default)]
    pub force: bool,

    /// Whether each VMM thread confines itself with its seccomp filter before it serves the
    /// guest: enforced (a forbidden system call kills the VMM) unless a person debugging a
    /// filter asks otherwise.
    #[serde(default)]
    pub seccomp: SeccompMode,

    /// Confine the VMM before the guest runs ([`JailConfig`]); `None`: it runs as started (for
    /// tests of the VMM itself and for hosts where the jail cannot be built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailConfig>,
}

/// What the VMM's per-thread seccomp filters do with a system call outside their lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// Kill the whole VMM (`SECCOMP_RET_KILL_PROCESS`). The default, and the only mode for a
    /// guest that is not being debugged.
    #[default]
    Enforce,
    /// Allow the call and have the kernel log it (`SECCOMP_RET_LOG`: the audit log, or `dmesg`
    /// without auditd): for finding what a filter lacks.
    Log,
    /// No filters at all.
    Off,
}

/// A virtio block device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The backing file. Absolute.
    pub path: PathBuf,
    /// The guest cannot write (the device offers VIRTIO_BLK_F_RO; the file is opened read-only).
    #[serde(default)]
    pub read_only: bool,
    /// Limits the guest's I/O on this disk ([`RateLimitConfig`]); `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

/// A virtio-vsock device whose host side is the unix socket `uds_path`: the host connects to
/// it and writes `CONNECT <port>\n`; a guest connection to host port P reaches a listener at
/// `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 to 2^32-2 (0-2 are reserved, 2^32-1 is "any").
    pub guest_cid: u64,
    /// Where the VMM listens. Absolute, and short enough for a `sockaddr_un`.
    pub uds_path: PathBuf,
}

/// A virtio-net device on the host tap `tap_name` (attached to, or created if missing, with MTU
/// `mtu`), seen by the guest with address `mac` and MTU `mtu`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's interface name: 1 to 15 bytes, no `/`, `:` or whitespace.
    pub tap_name: String,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// 68 (IPv4's minimum) to 65535.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

/// A virtio-fs device served by the vhost-user daemon (virtiofsd) listening on `socket`; the
/// guest mounts it with `mount -t virtiofs <tag> DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// 1 to [`MAX_FS_TAG_BYTES`] bytes, no NUL.
    pub tag: String,
    /// The daemon's socket. Absolute, and short enough for a `sockaddr_un`.
    pub socket: PathBuf,
}

fn default_mtu() -> u16 {
    1500
}

fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

impl VmConfig {
    /// A VM with `kernel`, the default command line, [`DEFAULT_VCPUS`], [`DEFAULT_MEMORY_MIB`]
    /// and no devices.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: KernelCmdline::default(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            disks: Vec::new(),
            vsock: None,
            rng: false,
            nets: Vec::new(),
            fs: Vec::new(),
            force: false,
            seccomp: SeccompMode::Enforce,
            jail: None,
        }
    }

    /// How many virtio-mmio devices (each takes an IRQ line and an MMIO window) the VM gets.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + self.nets.len()
            + self.fs.len()
    }

    /// The config as JSON, after [`VmConfig::validate`]: what the VMM reads.
    pub fn to_json(&self) -> Result<Vec<u8>, ConfigError> {
        self.validate()?;
        let json = serde_json::to_vec(self).map_err(ConfigError::Json)?;
        if json.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                max: MAX_CONFIG_BYTES,
            });
        }
        Ok(json)
    }

    /// Parses and validates a config from JSON bytes (at most [`MAX_CONFIG_BYTES`]).
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        if json.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                max: MAX_CONFIG_BYTES,
            });
        }
        let config: VmConfig = serde_json::from_slice(json).map_err(ConfigError::Json)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config to its end, but never more than [`MAX_CONFIG_BYTES`] (a longer stream is
    /// refused without reading the rest), then parses and validates it.
    pub fn from_reader(reader: impl Read) -> Result<Self, ConfigError> {
        let mut json = Vec::new();
        reader
            .take(MAX_CONFIG_BYTES as u64 + 1)
            .read_to_end(&mut json)
            .map_err(ConfigError::Read)?;
        Self::from_json(&json)
    }
}

#[cfg(test)]
mod tests;
