//! A cgroup v2 leaf per VM with its memory and pids limits: made (and removed) by whoever
//! starts the VMM, joined by the VMM as its first jail step.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use crate::{JailError, JailIds, Result};

/// Where cgroup v2 is looked for.
pub const HIERARCHY: &str = "/sys/fs/cgroup";
/// The group every VM's leaf is made in, below [`HIERARCHY`].
pub const GROUP: &str = "microvm";
/// What the VMM itself may use beyond guest memory (its code, device buffers, page cache of
/// the disks it reads): [`CgroupLimits::for_vm`] adds it to `memory.max`.
pub const VMM_OVERHEAD_MIB: u64 = 128;
/// Processes and threads beyond one per vCPU (the VMM's supervisor and PID 1, the event
/// thread, room for helper threads).
pub const PIDS_OVERHEAD: u64 = 16;

/// The limits written into a VM's leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `memory.max`, bytes.
    pub memory_max: u64,
    /// `pids.max`.
    pub pids_max: u64,
}

impl CgroupLimits {
    /// Guest memory plus [`VMM_OVERHEAD_MIB`]; one task per vCPU plus [`PIDS_OVERHEAD`].
    pub fn for_vm(memory_mib: u64, vcpus: u8) -> Self {
        Self {
            memory_max: (memory_mib + VMM_OVERHEAD_MIB) << 20,
            pids_max: u64::from(vcpus) + PIDS_OVERHEAD,
        }
    }
}

/// Whether `hierarchy` is a cgroup v2 mount.
pub fn is_cgroup2(hierarchy: &Path) -> bool {
    statfs(hierarchy).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// One VM's leaf, removed on drop (its processes killed first, through `cgroup.kill`).
#[derive(Debug)]
pub struct VmCgroup {
    path: PathBuf,
}

impl VmCgroup {
    /// Makes `<hierarchy>/<group>/<name>` with `limits`, enabling the memory and pids
    /// controllers on the way down. A leftover leaf of that name (a VM whose starter was
    /// killed) is removed first.
    pub fn create(hierarchy: &Path, group: &str, name: &str, limits: CgroupLimits) -> Result<Self> {
        check_name(name)?;
        let parent = prepare_group(hierarchy, group)?;
        Self::make_leaf(&parent, name, limits)
    }

    /// [`VmCgroup::create`] for the VM holding `ids`: its leaf is [`leaf_name`] of its uid,
    /// and the group's stale leaves are removed first ([`remove_stale_leaves`]), so the leaves
    /// of VMs whose starter was SIGKILLed do not pile up.
    pub fn create_for(
        hierarchy: &Path,
        group: &str,
        ids: &JailIds,
        limits: CgroupLimits,
    ) -> Result<Self> {
        let parent = prepare_group(hierarchy, group)?;
        remove_stale_leaves(&parent, ids);
        Self::make_leaf(&parent, &leaf_name(ids.uid()), limits)
    }

    fn make_leaf(parent: &Path, name: &str, limits: CgroupLimits) -> Result<Self> {
        let leaf = Self {
            path: parent.join(name),
        };
        if leaf.path.exists() {
            leaf.remove();
        }
        fs::create_dir(&leaf.path)
            .map_err(JailError::io(format!("create {}", leaf.path.display())))?;
        // From here on, dropping `leaf` removes the directory again.
        leaf.write("memory.max", &limits.memory_max.to_string())?;
        leaf.write("pids.max", &limits.pids_max.to_string())?;
        Ok(leaf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.path.join(file);
        fs::write(&path, value).map_err(JailError::io(format!(
            "write {value} to {}",
            path.display()
        )))
    }

    /// Kills what is left in the leaf and removes it; waits (bounded) for the killed processes
    /// to leave, since a killed VMM's exit is asynchronous.
    fn remove(&self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..400 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        tracing::warn!("cannot remove the VM's cgroup {}", self.path.display());
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The leaf of the VM whose uid is `uid`.
pub fn leaf_name(uid: u32) -> String {
    format!("vm{uid}")
}

/// Removes, from the group `parent`, the leaves of VMs that are gone but whose starter never
/// removed them (it was SIGKILLed): a leaf named [`leaf_name`] of an id in `ids`' range whose
/// slot no one holds (so no starter is between making the leaf and its VMM joining it; the
/// slot stays held while the leaf is removed, so the id cannot be taken meanwhile), with no
/// process (`cgroup.procs` empty and `populated 0` in `cgroup.events`). Nothing is killed: a
/// populated leaf is left alone, and so is anything else in the group. Returns what was removed.
pub fn remove_stale_leaves(parent: &Path, ids: &JailIds) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm"))
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|id| *id != ids.uid() && name.to_str() == Some(leaf_name(*id).as_str()))
        else {
            continue;
        };
        let Some(_slot) = ids.hold_if_free(id) else {
            continue;
        };
        let path = entry.path();
        if !is_empty(&path) {
            continue;
        }
        match fs::remove_dir(&path) {
            Ok(()) => {
                tracing::info!("removed the stale cgroup {} of a gone VM", path.display());
                removed.push(path);
            }
            Err(e) => tracing::warn!("cannot remove the stale cgroup {}: {e}", path.display()),
        }
    }
    removed
}

/// Whether the cgroup at `path` has no process, in it or below it.
fn is_empty(path: &Path) -> bool {
    let read = |file: &str| fs::read_to_string(path.join(file));
    let no_procs = read("cgroup.procs").is_ok_and(|p| p.trim().is_empty());
    let unpopulated = read("cgroup.events").is_ok_and(|e| e.lines().any(|l| l == "populated 0"));
    no_procs && unpopulated
}

/// Checks the name of a group (or one component of it) or leaf: one plain path component.
fn check_name(part: &str) -> Result<()> {
    let plain = !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if plain {
        Ok(())
    } else {
        Err(JailError::Invalid(format!("bad cgroup name {part:?}")))
    }
}

/// `<hierarchy>/<group>`, made when missing, with the memory and pids controllers enabled on
/// the way down. `group` may be nested (`kubepods/burstable/pod<uid>`, a pod's cgroup parent):
/// each `/`-separated component must be a plain name (no `..`, nothing absolute), so the group
/// stays beneath `hierarchy` whatever a pod spec names.
fn prepare_group(hierarchy: &Path, group: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = group.split('/').collect();
    for part in &parts {
        check_name(part)?;
    }
    if !is_cgroup2(hierarchy) {
        return Err(JailError::Invalid(format!(
            "{} is not a cgroup v2 mount",
            hierarchy.display()
        )));
    }
    enable_controllers(hierarchy)?;
    let mut parent = hierarchy.to_path_buf();
    for part in parts {
        parent.push(part);
        match fs::create_dir(&parent) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                return Err(JailError::io(format!("create {}", parent.display()))(e))
            }
            _ => {}
        }
        enable_controllers(&parent)?;
    }
    Ok(parent)
}

/// Delegates the memory and pids controllers to `dir`'s children.
fn enable_controllers(dir: &Path) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let enabled =
        fs::read_to_string(&path).map_err(JailError::io(format!("read {}", path.display())))?;
    let missing: Vec<String> = ["memory", "pids"]
        .into_iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    fs::write(&path, &value).map_err(JailError::io(format!(
        "write {value} to {}",
        path.display()
    )))
}

/// The first jail step: moves the calling process (with all its threads, and the children it
/// forks later) into the leaf `cgroup`.
pub fn join_cgroup(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    // "0" is the writing process itself.
    fs::write(&procs, "0").map_err(JailError::io(format!("join {}", cgroup.display())))
}
