//! The shim's TOML configuration: where the guest kernel, agent and VMM are, the default VM
//! size, how many container slots a pod's VM has, and the log level.
//!
//! Found through the CRI runtime option `ConfigPath` (containerd passes it in the create
//! request's options), else [`DEFAULT_PATH`]; a missing default file means "all defaults".

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is read from when the runtime options name none.
pub const DEFAULT_PATH: &str = "/etc/microvm/shim.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// The guest kernel; default: `sandbox::locate::kernel()`.
    pub kernel: Option<PathBuf>,
    /// The static guest agent; default: `sandbox::locate::agent()`.
    pub agent: Option<PathBuf>,
    /// The VMM binary (`microvm-vmm`); default: `sandbox::locate::vmm()`.
    pub vmm: Option<PathBuf>,
    /// The virtio-fs daemon serving the pod's volumes; default: `sandbox::locate::virtiofsd()`
    /// (a pod VM booted without one refuses host bind mounts).
    pub virtiofsd: Option<PathBuf>,
    /// vCPUs of a pod's VM before the pod's own CPU limit is added.
    pub cpus: u8,
    /// Memory (MiB) of a pod's VM before the pod's own memory limit is added.
    pub memory_mib: u64,
    /// Containers a pod's VM can hold at once (one pre-attached disk each; the VMM has no
    /// disk hotplug).
    pub slots: usize,
    /// Size of each slot disk (sparse: only the written image takes space).
    pub slot_size_gib: u64,
    /// The shim's and the guest agent's log level (tracing filter syntax, e.g. "info").
    pub log_level: String,
    /// Seconds to wait for the guest agent after starting the VMM.
    pub boot_timeout_s: u64,
    /// The most vCPUs a pod's VM may have, its pod's CPU limit included: a pod asking for
    /// more is refused (its annotations are the pod author's to write).
    pub max_cpus: u8,
    /// The most memory (MiB) a pod's VM may have, its pod's memory limit included.
    pub max_memory_mib: u64,
    /// The pod's `console.log` (guest console and VMM log, on a tmpfs) is rotated when it
    /// grows past this: it becomes `console.log.1` (its last this-many KiB), replacing the
    /// one before.
    pub console_log_max_kib: u64,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            kernel: None,
            agent: None,
            vmm: None,
            virtiofsd: None,
            cpus: 1,
            memory_mib: 256,
            slots: 8,
            slot_size_gib: 8,
            log_level: "info".into(),
            boot_timeout_s: 90,
            max_cpus: 8,
            max_memory_mib: 8192,
            console_log_max_kib: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read the shim config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse the shim config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("shim config {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

impl ShimConfig {
    /// Reads `path`, or the default path (where a missing file means defaults).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, must_exist) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: ShimConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let invalid = |what: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            what: what.into(),
        };
        if cfg.cpus == 0 {
            return Err(invalid("cpus must be at least 1"));
        }
        if cfg.memory_mib < 64 {
            return Err(invalid("memory_mib must be at least 64"));
        }
        if cfg.slots == 0 || cfg.slots > 20 {
            return Err(invalid(
                "slots must be 1 to 20 (guest disks /dev/vda to /dev/vdt)",
            ));
        }
        if cfg.slot_size_gib == 0 {
            return Err(invalid("slot_size_gib must be at least 1"));
        }
        if cfg.max_cpus < cfg.cpus || cfg.max_cpus > 32 {
            return Err(invalid("max_cpus must be at least cpus and at most 32"));
        }
        if cfg.max_memory_mib < cfg.memory_mib {
            return Err(invalid("max_memory_mib must be at least memory_mib"));
        }
        if cfg.console_log_max_kib < 4 {
            return Err(invalid("console_log_max_kib must be at least 4"));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let p = Path::new("x.toml");
        assert_eq!(ShimConfig::parse("", p).unwrap(), ShimConfig::default());
        let c = ShimConfig::parse(
            "kernel = \"/k\"\ncpus = 2\nmemory_mib = 512\nlog_level = \"debug\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!((c.cpus, c.memory_mib, c.slots), (2, 512, 8));
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn bad_config_is_named() {
        let p = Path::new("/etc/x.toml");
        let e = ShimConfig::parse("cpu = 2", p).unwrap_err().to_string();
        assert!(e.contains("/etc/x.toml") && e.contains("cpu"), "{e}");
        let e = ShimConfig::parse("slots = 0", p).unwrap_err().to_string();
        assert!(e.contains("slots"), "{e}");
        let e = ShimConfig::parse("memory_mib = 1024\nmax_memory_mib = 512", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_memory_mib"), "{e}");
        let e = ShimConfig::parse("cpus = 4\nmax_cpus = 2", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_cpus"), "{e}");
    }

    #[test]
    fn a_missing_named_file_is_an_error_and_the_default_is_not() {
        assert!(ShimConfig::load(Some(Path::new("/nonexistent/shim.toml"))).is_err());
    }
}
