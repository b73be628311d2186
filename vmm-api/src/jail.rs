//! The jail the VMM puts itself in before the guest runs (the `jail` crate does it; this is
//! what the starter asks for).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::validate::{check_path, ConfigError, MAX_PATH_BYTES};

/// Where every VM's cgroup leaf must lie: the cgroup v2 hierarchy's usual mount point.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How the VMM confines itself: a PID, mount, IPC and UTS namespace of its own (and a network
/// namespace unless the VM has net devices, whose taps live in the namespace it was started
/// in), a root holding only its vsock socket's directory, this unprivileged uid and gid with no
/// supplementary groups and no capabilities, no_new_privs, and the cgroup leaf `cgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The VMM's user id from the moment the guest runs: not 0, not -1, and shared with no
    /// other VM (the starter allocates it).
    pub uid: u32,
    /// Its group id, under the same rules.
    pub gid: u32,
    /// A cgroup v2 directory (under [`CGROUP_ROOT`]) the starter created with the VM's limits;
    /// the VMM moves itself into it first. `None`: no cgroup of its own (a host without
    /// cgroup v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

impl JailConfig {
    /// Ids that are not root's or the "no id" -1, a cgroup beneath [`CGROUP_ROOT`] without `..`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, id) in [("jail.uid", self.uid), ("jail.gid", self.gid)] {
            if id == 0 || id == u32::MAX {
                return Err(ConfigError::JailId { field, id });
            }
        }
        if let Some(cgroup) = &self.cgroup {
            check_path("jail.cgroup", cgroup, MAX_PATH_BYTES)?;
            if !beneath(cgroup, Path::new(CGROUP_ROOT)) {
                return Err(ConfigError::JailCgroup(cgroup.clone()));
            }
        }
        Ok(())
    }
}

/// Whether `path` names something strictly below `root` with only normal components after it.
fn beneath(path: &Path, root: &Path) -> bool {
    match path.strip_prefix(root) {
        Ok(rest) => {
            rest.components().next().is_some()
                && rest.components().all(|c| matches!(c, Component::Normal(_)))
        }
        Err(_) => false,
    }
}
