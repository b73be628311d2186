//! A per-VM unprivileged uid and gid, from a fixed high range, one lock file per slot so two
//! VMs never share one; the slot is free again when its [`JailIds`] is dropped (or its holder
//! dies: the lock is an `flock`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::{JailError, Result};

/// The first jail id: above the ids of ordinary users and of `SHARE_ID_BASE`'s range
/// (1 000 000 000 and up), below 2^31 (some tools treat ids as signed).
pub const JAIL_ID_BASE: u32 = 900_000_000;
/// How many VMs can be jailed at once.
pub const JAIL_ID_COUNT: u32 = 65_536;
/// Where the slots' lock files live (root's, mode 0700).
pub const DEFAULT_LOCK_DIR: &str = "/run/microvm/jail-ids";

/// One VM's uid and gid (the same number), held until dropped.
#[derive(Debug)]
pub struct JailIds {
    id: u32,
    _lock: Flock<File>,
}

impl JailIds {
    /// The first free id in the default range.
    pub fn allocate() -> Result<Self> {
        Self::allocate_in(Path::new(DEFAULT_LOCK_DIR), JAIL_ID_BASE, JAIL_ID_COUNT)
    }

    /// The first free id of `base..base + count`, its lock file in `dir`.
    pub fn allocate_in(dir: &Path, base: u32, count: u32) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(JailError::io(format!("create {}", dir.display())))?;
        for slot in 0..count {
            let path: PathBuf = dir.join(slot.to_string());
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(JailError::io(format!("open {}", path.display())))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return Ok(Self {
                        id: base + slot,
                        _lock: lock,
                    })
                }
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(JailError::sys(format!("lock {}", path.display()))(e)),
            }
        }
        Err(JailError::Invalid(format!(
            "all {count} jail ids from {base} are in use"
        )))
    }

    pub fn uid(&self) -> u32 {
        self.id
    }

    pub fn gid(&self) -> u32 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_holders_never_share_an_id_and_a_dropped_one_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = JailIds::allocate_in(dir.path(), 5000, 3).unwrap();
        let b = JailIds::allocate_in(dir.path(), 5000, 3).unwrap();
        let c = JailIds::allocate_in(dir.path(), 5000, 3).unwrap();
        assert_eq!((a.uid(), b.uid(), c.uid()), (5000, 5001, 5002));
        assert_eq!(a.gid(), a.uid());
        let err = JailIds::allocate_in(dir.path(), 5000, 3).unwrap_err();
        assert!(err.to_string().contains("all 3 jail ids"), "{err}");
        drop(b);
        assert_eq!(
            JailIds::allocate_in(dir.path(), 5000, 3).unwrap().uid(),
            5001
        );
    }
}
