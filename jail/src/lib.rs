//! The VMM's jail, as Firecracker's jailer builds it and stricter where cheap, written as named
//! steps (youki's shape): each a small function in [`steps`], [`cgroup`] or [`pid1`], applied
//! in this order by the VMM process itself (`microvm-vmm`, started as root):
//!
//! 1. [`Jail::fork_into_pid_namespace`] (single-threaded, as root): [`cgroup::join_cgroup`]
//!    (the leaf the starter made with [`cgroup::VmCgroup`]), `unshare(CLONE_NEWPID)`, `fork`.
//!    The parent becomes a [`pid1::Supervisor`] that drops every privilege at once and only
//!    waits and relays the exit; the child is PID 1 of the new namespace and dies with its
//!    supervisor (`PR_SET_PDEATHSIG`, SIGKILL: delivered even to a PID 1 because it comes from
//!    an ancestor namespace), so killing the process the starter knows kills the VMM.
//! 2. [`Jail::isolate`] (PID 1, as root): new mount, IPC, UTS and, unless the VM has net
//!    devices, network namespaces; every mount made private, so nothing mounted later reaches
//!    the host.
//! 3. The VMM opens what it needs as root: `/dev/kvm`, the taps (in the namespace it was put
//!    in), disks, kernel, initrd, the vhost-user sockets; it binds its vsock socket.
//! 4. [`Jail::confine`] (before the guest's first instruction and before any other thread,
//!    because capabilities are per thread): [`steps::build_root`] (a small read-only tmpfs
//!    holding only the directories named in [`Jail::visible_dirs`], bound read-only at their
//!    own paths), [`steps::pivot_root`], [`steps::drop_capability_bounds`] (bounding, ambient,
//!    inheritable), [`steps::drop_identity`] (no groups, the VM's gid and uid),
//!    [`steps::clear_capabilities`] (effective, permitted), [`steps::set_no_new_privs`], and the
//!    parent-death signal armed again (a credential change clears it).
//!
//! Seccomp filters come after all of this (they are the VMM's, per thread).

pub mod cgroup;
pub mod ids;
pub mod pid1;
pub mod steps;

use std::path::PathBuf;

use nix::unistd::{Gid, Uid};

pub use cgroup::{CgroupLimits, VmCgroup};
pub use ids::JailIds;
pub use pid1::{ChildExit, Forked, ParentLink, Supervisor};

/// Why a jail step failed: the step's name and the system's answer.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("jail: {step}: {source}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: {step}: {source}")]
    Caps {
        step: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("jail: {0}")]
    Invalid(String),
}

impl JailError {
    pub(crate) fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> Self {
        let step = step.into();
        move |source| Self::Sys { step, source }
    }

    pub(crate) fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let step = step.into();
        move |source| Self::Io { step, source }
    }
}

pub type Result<T, E = JailError> = std::result::Result<T, E>;

/// What the VMM is confined to.
#[derive(Debug, Clone)]
pub struct Jail {
    /// The identity it ends with (never root: checked by [`Jail::new`]).
    pub uid: Uid,
    pub gid: Gid,
    /// The cgroup v2 leaf it joins first; `None`: it stays where it was started.
    pub cgroup: Option<PathBuf>,
    /// A network namespace of its own (false when its taps live in the one it was started in).
    pub new_network_namespace: bool,
    /// Host directories that stay reachable, read-only, at the same path inside the new root
    /// (the vsock socket's directory, where the host's `<socket>_<port>` listeners appear).
    /// Everything else the VMM uses is opened before the root changes.
    pub visible_dirs: Vec<PathBuf>,
}

impl Jail {
    /// A jail for `uid`/`gid` (neither may be root's) with no cgroup, a network namespace of
    /// its own and an empty root.
    pub fn new(uid: u32, gid: u32) -> Result<Self> {
        if uid == 0 || gid == 0 {
            return Err(JailError::Invalid(format!(
                "the jail's ids must not be root's (uid {uid}, gid {gid})"
            )));
        }
        Ok(Self {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            cgroup: None,
            new_network_namespace: true,
            visible_dirs: Vec::new(),
        })
    }

    /// Step 1: see the crate's documentation. Must be called while the process has one thread.
    pub fn fork_into_pid_namespace(&self) -> Result<Forked> {
        if let Some(cgroup) = &self.cgroup {
            cgroup::join_cgroup(cgroup)?;
        }
        pid1::fork_into_pid_namespace(self)
    }

    /// Step 2, in PID 1: namespaces of its own, mounts private.
    pub fn isolate(&self) -> Result<()> {
        steps::unshare_namespaces(self.new_network_namespace)?;
        steps::make_mounts_private()
    }

    /// Step 4, in PID 1, once everything the VMM needs is open and before any other thread
    /// exists: the new root, then every privilege goes.
    pub fn confine(&self, parent: &ParentLink) -> Result<()> {
        let root = steps::build_root(&self.visible_dirs)?;
        steps::pivot_root(&root)?;
        self.drop_privileges()?;
        parent.arm_death_signal()
    }

    /// The identity, capability and no_new_privs steps, shared by PID 1 and its supervisor.
    pub(crate) fn drop_privileges(&self) -> Result<()> {
        steps::drop_capability_bounds()?;
        steps::drop_identity(self.uid, self.gid)?;
        steps::clear_capabilities()?;
        steps::set_no_new_privs()
    }
}
