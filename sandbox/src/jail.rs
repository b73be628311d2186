//! The host's side of a VM's jail: a per-VM unprivileged uid/gid and a cgroup v2 leaf, made
//! before the VMM starts and named in its config ([`vmm_api::JailConfig`]); the VMM confines
//! itself with them (the `jail` crate).

use std::path::Path;
use std::sync::Once;

use jail::cgroup::{self, CgroupLimits, VmCgroup};
use jail::JailIds;
use vmm_api::{JailConfig, VmConfig};

use crate::{Error, Result};

/// What a jailed VM holds on the host: dropped after its VMM is reaped, it removes the cgroup
/// leaf (killing anything left in it) and frees the ids.
#[derive(Debug)]
pub struct VmJail {
    // Dropped first: the leaf goes before its ids can be handed to another VM (whose leaf has
    // the same name).
    cgroup: Option<VmCgroup>,
    ids: JailIds,
}

impl VmJail {
    /// Allocates the VM's ids and cgroup leaf (`/sys/fs/cgroup/<group>/vm<uid>`, memory.max =
    /// guest memory + the VMM's overhead, pids.max = vCPUs + a few) and writes them into
    /// `config.jail`, removing the stale leaves of gone VMs on the way. `group`: a pod's cgroup
    /// parent; `None`: [`cgroup::GROUP`]. Without cgroup v2 at `/sys/fs/cgroup` the VM
    /// runs without a leaf of its own, with one warning per process; a cgroup v2 that refuses
    /// the leaf (or a group that would leave the hierarchy) is an error.
    pub fn prepare(config: &mut VmConfig, group: Option<&str>) -> Result<VmJail> {
        let ids = JailIds::allocate().map_err(|e| Error::Invalid(e.to_string()))?;
        let hierarchy = Path::new(cgroup::HIERARCHY);
        let cgroup = if cgroup::is_cgroup2(hierarchy) {
            let limits = CgroupLimits::for_vm(config.memory_mib, config.vcpus);
            Some(
                VmCgroup::create_for(hierarchy, group.unwrap_or(cgroup::GROUP), &ids, limits)
                    .map_err(|e| Error::Invalid(e.to_string()))?,
            )
        } else {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "{} is not cgroup v2: VMs run without a cgroup of their own (no memory or \
                     pids limit); the rest of the jail applies",
                    cgroup::HIERARCHY
                )
            });
            None
        };
        config.jail = Some(JailConfig {
            uid: ids.uid(),
            gid: ids.gid(),
            cgroup: cgroup.as_ref().map(|c| c.path().to_path_buf()),
        });
        Ok(VmJail { cgroup, ids })
    }

    /// The VM's uid (its gid is the same number).
    pub fn uid(&self) -> u32 {
        self.ids.uid()
    }

    /// The VM's cgroup leaf, if it has one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(VmCgroup::path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two VMs get two ids, written into their configs with the leaf (where cgroup v2 is).
    #[test]
    fn each_vm_gets_its_own_ids_in_its_config() {
        let mut a = VmConfig::new("/k");
        let mut b = VmConfig::new("/k");
        let ja = VmJail::prepare(&mut a, None).unwrap();
        let jb = VmJail::prepare(&mut b, None).unwrap();
        assert_ne!(ja.uid(), jb.uid());
        let (ca, cb) = (a.jail.clone().unwrap(), b.jail.clone().unwrap());
        assert_eq!((ca.uid, ca.gid), (ja.uid(), ja.uid()));
        assert_eq!((cb.uid, cb.gid), (jb.uid(), jb.uid()));
        assert!(ja.uid() >= jail::ids::JAIL_ID_BASE);
        assert_eq!(ca.cgroup.as_deref(), ja.cgroup());
        if let Some(leaf) = ja.cgroup() {
            assert!(leaf.ends_with(format!("microvm/vm{}", ja.uid())));
            assert!(leaf.is_dir());
        }
        a.validate().unwrap();
        let leaf = ja.cgroup().map(Path::to_path_buf);
        drop(ja);
        assert!(
            leaf.is_none_or(|l| !l.exists()),
            "the leaf goes with the jail"
        );
    }
}
