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
    /// The range it came from, for [`JailIds::hold_if_free`].
    dir: PathBuf,
    base: u32,
    count: u32,
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
            if let Some(lock) = lock_slot(dir, slot)? {
                return Ok(Self {
                    id: base + slot,
                    _lock: lock,
                    dir: dir.to_path_buf(),
                    base,
                    count,
                });
            }
        }
        Err(JailError::Invalid(format!(
            "all {count} jail ids from {base} are in use"
        )))
    }

    /// Holds `id`'s slot of this range while the returned lock lives, if no one (no live
    /// starter, this process included) holds it: then no VM owns `id` and none can take it
    /// meanwhile. `None` for an id outside the range, a held slot, or a slot that cannot be
    /// opened.
    pub fn hold_if_free(&self, id: u32) -> Option<Flock<File>> {
        let slot = id.checked_sub(self.base).filter(|s| *s < self.count)?;
        lock_slot(&self.dir, slot).ok().flatten()
    }

    pub fn uid(&self) -> u32 {
        self.id
    }

    pub fn gid(&self) -> u32 {
        self.id
    }
}

/// Takes slot `slot`'s lock in `dir` without waiting: `None` when someone holds it.
fn lock_slot(dir: &Path, slot: u32) -> Result<Option<Flock<File>>> {
    let path: PathBuf = dir.join(slot.to_string());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(JailError::io(format!("open {}", path.display())))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(JailError::sys(format!("lock {}", path.display()))(e)),
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
        // Held slots (this process's own included) are not free; a dropped one is.
        assert!(a.hold_if_free(5001).is_none());
        assert!(a.hold_if_free(5000).is_none());
        assert!(a.hold_if_free(5003).is_none(), "outside the range");
        drop(b);
        let held = a.hold_if_free(5001).expect("a dropped slot is free");
        assert!(JailIds::allocate_in(dir.path(), 5000, 3).is_err());
        drop(held);
        assert_eq!(
            JailIds::allocate_in(dir.path(), 5000, 3).unwrap().uid(),
            5001
        );
    }
}
