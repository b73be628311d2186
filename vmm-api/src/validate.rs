//! Every check a [`VmConfig`] must pass, and the limits behind them: the one place both the
//! sandbox (before it starts the VMM) and the VMM (before it builds anything) ask.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{FsConfig, NetConfig, VmConfig, VsockConfig, MAX_CMDLINE_BYTES};

/// vCPUs a VM may have: the MP table (no ACPI) describes up to 32.
pub const MAX_VCPUS: u8 = 32;
/// The smallest guest memory that boots microvm's kernel with an initramfs.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest guest memory a config may ask for (1 TiB); the VMM also refuses more than the
/// host has.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// virtio-mmio devices a VM may have: one legacy IRQ line each, 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Disks a VM may have (all of them share [`MAX_VIRTIO_DEVICES`] with the other devices).
pub const MAX_DISKS: usize = MAX_VIRTIO_DEVICES;
/// The longest virtio-fs tag: the device's config space holds 36 bytes.
pub const MAX_FS_TAG_BYTES: usize = 36;
/// The longest host path in a config (Linux's `PATH_MAX` less its NUL).
pub const MAX_PATH_BYTES: usize = 4095;
/// The longest vsock socket path: `sockaddr_un`'s `sun_path` less its NUL.
pub const MAX_UDS_PATH_BYTES: usize = 107;
/// The largest config the VMM reads. A config of 21 paths of [`MAX_PATH_BYTES`] printable
/// characters and the longest command line is about 90 KiB.
pub const MAX_CONFIG_BYTES: usize = 128 * 1024;

/// Why a config was refused. Each message is one line and names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the VM config: {0}")]
    Read(#[source] std::io::Error),
    #[error("the VM config is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("the VM config is not valid: {0}")]
    Json(#[source] serde_json::Error),
    #[error("vcpus must be 1 to {MAX_VCPUS}, not {0}")]
    Vcpus(u8),
    #[error("memory_mib must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}, not {0}")]
    Memory(u64),
    #[error("{field} must be an absolute path, not {path:?}")]
    RelativePath { field: String, path: PathBuf },
    #[error("{field} must not contain a NUL byte")]
    NulInPath { field: String },
    #[error("{field} is longer than {max} bytes")]
    PathTooLong { field: String, max: usize },
    #[error("at most {MAX_DISKS} disks, not {0}")]
    TooManyDisks(usize),
    #[error("at most {MAX_VIRTIO_DEVICES} virtio devices (disks, vsock, rng, nets, fs), not {0}")]
    TooManyDevices(usize),
    #[error("vsock.guest_cid must be 3 to {max}, not {0}", max = u32::MAX - 1)]
    GuestCid(u64),
    #[error("tap name {0:?} must be 1 to 15 bytes without '/', ':' or whitespace")]
    TapName(String),
    #[error("the MAC address of tap {0:?} must be unicast (first byte even)")]
    MulticastMac(String),
    #[error("the MTU of tap {tap:?} must be 68 to 65535, not {mtu}")]
    Mtu { tap: String, mtu: u16 },
    #[error("virtio-fs tag {0:?} must be 1 to {MAX_FS_TAG_BYTES} bytes without NUL")]
    FsTag(String),
    #[error("cmdline.base must be printable ASCII (no control characters)")]
    CmdlineBase,
    #[error("cmdline.params[{index}] {param:?}: {problem}")]
    CmdlineParam {
        index: usize,
        param: String,
        problem: &'static str,
    },
    #[error("the kernel command line is longer than {MAX_CMDLINE_BYTES} bytes ({0})")]
    CmdlineTooLong(usize),
    #[error("{field} must be an unprivileged id (not 0 or {max}), not {id}", max = u32::MAX)]
    JailId { field: &'static str, id: u32 },
    #[error("{field}: {problem}")]
    RateLimit {
        field: String,
        problem: &'static str,
    },
    #[error("jail.cgroup must be a directory beneath {root}, not {0:?}", root = crate::CGROUP_ROOT)]
    JailCgroup(PathBuf),
}

impl VmConfig {
    /// Checks every field against the limits above; the first problem found is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        check_path("kernel", &self.kernel, MAX_PATH_BYTES)?;
        if let Some(initrd) = &self.initrd {
            check_path("initrd", initrd, MAX_PATH_BYTES)?;
        }
        self.validate_cmdline()?;
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            check_path(&format!("disks[{i}].path"), &disk.path, MAX_PATH_BYTES)?;
            if let Some(limit) = &disk.rate_limit {
                limit.validate(&format!("disks[{i}].rate_limit"))?;
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        for net in &self.nets {
            net.validate()?;
        }
        for fs in &self.fs {
            fs.validate()?;
        }
        let devices = self.virtio_devices();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if let Some(jail) = &self.jail {
            jail.validate()?;
        }
        Ok(())
    }

    fn validate_cmdline(&self) -> Result<(), ConfigError> {
        let cmdline = &self.cmdline;
        if let Some(base) = &cmdline.base {
            if !base.chars().all(|c| c == ' ' || c.is_ascii_graphic()) {
                return Err(ConfigError::CmdlineBase);
            }
        }
        for (index, param) in cmdline.params.iter().enumerate() {
            if let Some(problem) = param.problem() {
                return Err(ConfigError::CmdlineParam {
                    index,
                    param: param.to_string(),
                    problem,
                });
            }
        }
        let len = cmdline.render().len();
        if len > MAX_CMDLINE_BYTES {
            return Err(ConfigError::CmdlineTooLong(len));
        }
        Ok(())
    }
}

impl VsockConfig {
    /// The guest CID's range and the socket path (also for front ends that parse one alone).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(3..u64::from(u32::MAX)).contains(&self.guest_cid) {
            return Err(ConfigError::GuestCid(self.guest_cid));
        }
        check_path("vsock.uds_path", &self.uds_path, MAX_UDS_PATH_BYTES)
    }
}

impl NetConfig {
    /// The tap name as Linux accepts it (`dev_valid_name`), a unicast MAC, a usable MTU.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.tap_name;
        let name_ok = (1..=15).contains(&name.len())
            && name != "."
            && name != ".."
            && !name
                .chars()
                .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
        if !name_ok {
            return Err(ConfigError::TapName(name.clone()));
        }
        if self.mac[0] & 1 != 0 {
            return Err(ConfigError::MulticastMac(name.clone()));
        }
        if self.mtu < 68 {
            return Err(ConfigError::Mtu {
                tap: name.clone(),
                mtu: self.mtu,
            });
        }
        Ok(())
    }
}

impl FsConfig {
    /// The tag's length and the socket path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tag.is_empty() || self.tag.len() > MAX_FS_TAG_BYTES || self.tag.contains('\0') {
            return Err(ConfigError::FsTag(self.tag.clone()));
        }
        check_path("fs.socket", &self.socket, MAX_UDS_PATH_BYTES)
    }
}

/// A host path in a config: absolute, no NUL (the kernel would cut it there), not too long.
pub(crate) fn check_path(field: &str, path: &Path, max: usize) -> Result<(), ConfigError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err(ConfigError::NulInPath {
            field: field.into(),
        });
    }
    if !path.is_absolute() {
        return Err(ConfigError::RelativePath {
            field: field.into(),
            path: path.into(),
        });
    }
    if bytes.len() > max {
        return Err(ConfigError::PathTooLong {
            field: field.into(),
            max,
        });
    }
    Ok(())
}
