//! Linux namespaces: which ones a container creates or joins, and the two places they are
//! entered: the PID namespace in the parent (it is chosen at fork time) and all others in the
//! child.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sched::{setns, unshare, CloneFlags};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

use crate::child::{ChildError, StepResult};
use crate::Error;

/// The namespace types this runtime handles, in the order they are joined: mount last, so the
/// paths of the others still resolve in the parent's mount namespace view.
const ORDER: [LinuxNamespaceType; 6] = [
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Mount,
];

/// Which namespaces the container's processes get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamespacePlan {
    /// Namespaces created fresh for the container's init, PID excluded.
    pub unshare: CloneFlags,
    /// Whether the init gets a new PID namespace (it is then PID 1 there).
    pub new_pid: bool,
    /// Existing namespaces the init joins instead, by path (PID included).
    pub join: Vec<(CloneFlags, PathBuf)>,
    /// Every namespace type the container has (created or joined): what `exec` enters.
    pub all: CloneFlags,
}

/// The clone flag for a namespace type, or why it is not supported.
pub(crate) fn clone_flag(typ: LinuxNamespaceType) -> Result<CloneFlags, Error> {
    Ok(match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::User => {
            return Err(Error::Unsupported(
                "user namespaces (the guest VM is the isolation boundary; containers run as \
                 root of the VM with capabilities dropped)"
                    .into(),
            ))
        }
        LinuxNamespaceType::Time => return Err(Error::Unsupported("time namespaces".into())),
    })
}

/// Builds the plan from the spec's `linux.namespaces` and the agent's `join_namespaces`
/// (which win over the spec for the same type). A mount namespace is required: without one
/// the container's mounts and `pivot_root` would change the agent's own view.
pub(crate) fn plan(
    spec_namespaces: &[LinuxNamespace],
    join: &[(LinuxNamespaceType, PathBuf)],
) -> Result<NamespacePlan, Error> {
    let mut wanted: Vec<(LinuxNamespaceType, Option<PathBuf>)> = Vec::new();
    for ns in spec_namespaces {
        if wanted.iter().any(|(t, _)| *t == ns.typ()) {
            return Err(Error::InvalidSpec(format!(
                "linux.namespaces: {} is listed twice",
                ns.typ()
            )));
        }
        wanted.push((ns.typ(), ns.path().clone()));
    }
    for (typ, path) in join {
        if !path.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "join_namespaces: {typ} path {} is not absolute",
                path.display()
            )));
        }
        match wanted.iter_mut().find(|(t, _)| t == typ) {
            Some(entry) => entry.1 = Some(path.clone()),
            None => wanted.push((*typ, Some(path.clone()))),
        }
    }
    let mut plan = NamespacePlan {
        unshare: CloneFlags::empty(),
        new_pid: false,
        join: Vec::new(),
        all: CloneFlags::empty(),
    };
    for typ in ORDER {
        let Some((_, path)) = wanted.iter().find(|(t, _)| *t == typ) else {
            continue;
        };
        let flag = clone_flag(typ)?;
        plan.all |= flag;
        match path {
            Some(path) if typ == LinuxNamespaceType::Mount => {
                return Err(Error::Unsupported(format!(
                    "joining an existing mount namespace ({}): each container needs its own",
                    path.display()
                )))
            }
            Some(path) => plan.join.push((flag, path.clone())),
            None if typ == LinuxNamespaceType::Pid => plan.new_pid = true,
            None => plan.unshare |= flag,
        }
    }
    // Reject the types this runtime cannot do even when they come without a path.
    for (typ, _) in &wanted {
        clone_flag(*typ)?;
    }
    if !plan.all.contains(CloneFlags::CLONE_NEWNS) {
        return Err(Error::InvalidSpec(
            "linux.namespaces: a mount namespace is required".into(),
        ));
    }
    Ok(plan)
}

/// Namespace files opened in the parent before the fork, so a bad path is an error of `start`
/// and the child only has to call `setns`.
pub(crate) struct OpenedNamespaces {
    pub pid: Option<OwnedFd>,
    pub others: Vec<(CloneFlags, OwnedFd)>,
}

/// Opens every namespace the plan joins.
pub(crate) fn open_joined(plan: &NamespacePlan) -> Result<OpenedNamespaces, Error> {
    let mut opened = OpenedNamespaces {
        pid: None,
        others: Vec::new(),
    };
    for (flag, path) in &plan.join {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("opening namespace {} to join", path.display()), e))?;
        let fd = OwnedFd::from(file);
        if *flag == CloneFlags::CLONE_NEWPID {
            opened.pid = Some(fd);
        } else {
            opened.others.push((*flag, fd));
        }
    }
    Ok(opened)
}

/// Where the next fork's child gets its PID namespace: the caller's, a new one, or a joined
/// one (a namespace file or a pidfd of a process in it).
pub(crate) enum PidNamespace<'a> {
    Inherit,
    New,
    Join(&'a OwnedFd),
}

/// Run on the short-lived spawner thread just before `fork`: sets that thread's "PID
/// namespace for children". The setting is per thread, so the agent's other threads and later
/// forks are not affected (the thread ends right after the fork).
pub(crate) fn set_pid_namespace_for_children(pid_ns: &PidNamespace<'_>) -> Result<(), Error> {
    match pid_ns {
        PidNamespace::Inherit => Ok(()),
        PidNamespace::New => {
            unshare(CloneFlags::CLONE_NEWPID).map_err(|e| Error::io("unshare(CLONE_NEWPID)", e))
        }
        PidNamespace::Join(fd) => setns(fd.as_fd(), CloneFlags::CLONE_NEWPID)
            .map_err(|e| Error::io("setns(CLONE_NEWPID)", e)),
    }
}

/// Child: joins the namespaces opened by the parent (mount namespaces are never joined here).
pub(crate) fn join(opened: &[(CloneFlags, OwnedFd)]) -> StepResult {
    for (flag, fd) in opened {
        setns(fd.as_fd(), *flag)
            .map_err(|e| ChildError::errno("join namespace", format!("setns({flag:?})"), e))?;
    }
    Ok(())
}

/// Child: creates the container's new namespaces (after joining its cgroup, so the new cgroup
/// namespace is rooted at the container's cgroup).
pub(crate) fn unshare_new(flags: CloneFlags) -> StepResult {
    if flags.is_empty() {
        return Ok(());
    }
    unshare(flags).map_err(|e| ChildError::errno("unshare", format!("unshare({flags:?})"), e))
}

/// Brings up the loopback device of the calling process's network namespace: a new namespace
/// has `lo` down, and docker (even with `--network none`) gives containers `127.0.0.1`. Two
/// ioctls on a throwaway socket, `SIOCGIFFLAGS` then `SIOCSIFFLAGS` with `IFF_UP`; only system
/// calls and no allocation, so forked children of a threaded process may call it.
pub(crate) fn loopback_up() -> Result<(), Errno> {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: ifreq is plain data (a name and a union of integers); all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills in the flags of the interface named in `req`, which outlives
    // the call; then the flags member of the union is the one the kernel wrote.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(Errno::last())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(Errno::last())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closes the socket opened above, once.
    unsafe { libc::close(fd) };
    result
}

/// Child of `exec`: enters the running init's namespaces through its pidfd (one `setns` for
/// all of them, Linux 5.8+). PID was entered before the fork.
pub(crate) fn enter_running(pidfd: &OwnedFd, all: CloneFlags) -> StepResult {
    let flags = all & !CloneFlags::CLONE_NEWPID;
    if flags.is_empty() {
        return Ok(());
    }
    setns(pidfd.as_fd(), flags).map_err(|e| {
        ChildError::errno(
            "join container namespaces",
            format!("setns(pidfd, {flags:?})"),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(typ: LinuxNamespaceType) -> LinuxNamespace {
        let mut n = LinuxNamespace::default();
        n.set_typ(typ);
        n
    }

    #[test]
    fn default_namespaces_are_created() {
        let spec = oci_spec::runtime::get_default_namespaces();
        let p = plan(&spec, &[]).unwrap();
        assert!(p.new_pid);
        assert!(p.join.is_empty());
        assert_eq!(
            p.unshare,
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWCGROUP
        );
        assert!(p.all.contains(CloneFlags::CLONE_NEWPID));
    }

    #[test]
    fn join_overrides_spec_and_adds() {
        let spec = vec![ns(LinuxNamespaceType::Mount), ns(LinuxNamespaceType::Pid)];
        let p = plan(
            &spec,
            &[
                (LinuxNamespaceType::Pid, "/proc/7/ns/pid".into()),
                (LinuxNamespaceType::Ipc, "/proc/7/ns/ipc".into()),
            ],
        )
        .unwrap();
        assert!(!p.new_pid);
        assert_eq!(p.unshare, CloneFlags::CLONE_NEWNS);
        assert_eq!(
            p.join,
            vec![
                (CloneFlags::CLONE_NEWPID, PathBuf::from("/proc/7/ns/pid")),
                (CloneFlags::CLONE_NEWIPC, PathBuf::from("/proc/7/ns/ipc")),
            ]
        );
        assert!(p.all.contains(CloneFlags::CLONE_NEWIPC));
    }

    #[test]
    fn bad_namespace_sets_are_rejected() {
        let no_mount = vec![ns(LinuxNamespaceType::Pid)];
        assert!(matches!(plan(&no_mount, &[]), Err(Error::InvalidSpec(_))));
        let twice = vec![ns(LinuxNamespaceType::Mount), ns(LinuxNamespaceType::Mount)];
        assert!(matches!(plan(&twice, &[]), Err(Error::InvalidSpec(_))));
        let user = vec![ns(LinuxNamespaceType::Mount), ns(LinuxNamespaceType::User)];
        assert!(matches!(plan(&user, &[]), Err(Error::Unsupported(_))));
        let relative = [(LinuxNamespaceType::Pid, PathBuf::from("proc/1/ns/pid"))];
        assert!(matches!(
            plan(&[ns(LinuxNamespaceType::Mount)], &relative),
            Err(Error::InvalidSpec(_))
        ));
    }
}
