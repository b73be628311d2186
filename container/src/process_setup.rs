//! The child's process steps: signals, session, stdio, inherited fds, oom score, hostname,
//! sysctls, then, in an order that keeps each step possible, rlimits, user and groups,
//! capabilities, no_new_privs, seccomp and `execve` of a [`ProcessPlan`].

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, CapsHashSet};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{access, dup2, execve, setresgid, setresuid, setsid, AccessFlags};
use nix::unistd::{Gid, Uid};

use crate::child::{ChildError, ChildErrorKind, StepResult};
use crate::process::{home_from_passwd, CapsPlan, ProcessPlan};
use crate::resolve::RootDir;
use crate::seccomp::SeccompProgram;

/// Default dispositions and an empty signal mask: the agent may ignore or block signals
/// (Rust ignores SIGPIPE), and both would otherwise be inherited by the workload.
pub(crate) fn reset_signals() -> StepResult {
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code of ours in signal context; this process is
        // single-threaded (just forked).
        unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) }
            .map_err(|e| ChildError::errno("reset signals", format!("signal({sig})"), e))?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| ChildError::errno("reset signals", "sigprocmask", e))
}

/// A session of its own: signals for the agent's terminal or process group do not reach the
/// container, and a pty can become its controlling terminal.
pub(crate) fn new_session() -> StepResult {
    setsid()
        .map(drop)
        .map_err(|e| ChildError::errno("new session", "setsid", e))
}

/// Puts `sources` on fds 0, 1, 2. They are first copied above 2 so that a source that is
/// itself 0, 1 or 2 is not overwritten before it is used.
pub(crate) fn install_stdio(sources: [RawFd; 3]) -> StepResult {
    let mut high = [0; 3];
    for (i, fd) in sources.iter().enumerate() {
        high[i] = fcntl(*fd, FcntlArg::F_DUPFD_CLOEXEC(3))
            .map_err(|e| ChildError::errno("stdio", format!("dup of fd {fd}"), e))?;
    }
    for (target, fd) in high.iter().enumerate() {
        dup2(*fd, target as RawFd)
            .map_err(|e| ChildError::errno("stdio", format!("dup2 onto fd {target}"), e))?;
    }
    Ok(())
}

/// Closes every fd above 2 that the setup does not use (`keep`), and marks the kept ones
/// close-on-exec. Close-on-exec alone is not enough: until `execve`, an fd the agent had open
/// (a directory of its own, another container's file) is reachable as `/proc/self/fd/N` by
/// every path this process walks in the container: the cwd, the executable's lookup, its
/// interpreter (runc's CVE-2024-21626).
pub(crate) fn close_inherited_fds(keep: &[RawFd]) -> StepResult {
    let entries = fs::read_dir("/proc/self/fd")
        .map_err(|e| ChildError::io("close fds", "reading /proc/self/fd", e))?;
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        let done = if keep.contains(&fd) {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
        } else {
            nix::unistd::close(fd)
        };
        match done {
            Ok(()) | Err(Errno::EBADF) => {} // EBADF: the directory's own fd, closed already
            Err(e) => return Err(ChildError::errno("close fds", format!("fd {fd}"), e)),
        }
    }
    Ok(())
}

/// Sets `oom_score_adj` while this process still sees a writable `/proc` and has
/// CAP_SYS_RESOURCE (lowering the score needs it).
pub(crate) fn set_oom_score_adj(adj: Option<i32>) -> StepResult {
    let Some(adj) = adj else { return Ok(()) };
    fs::write("/proc/self/oom_score_adj", adj.to_string())
        .map_err(|e| ChildError::io("oom score", format!("oom_score_adj {adj}"), e))
}

/// Hostname and domain name of the (new) UTS namespace.
pub(crate) fn set_hostname(hostname: Option<&str>, domainname: Option<&str>) -> StepResult {
    if let Some(h) = hostname {
        nix::unistd::sethostname(h)
            .map_err(|e| ChildError::errno("hostname", format!("sethostname({h:?})"), e))?;
    }
    if let Some(d) = domainname {
        fs::write("/proc/sys/kernel/domainname", d)
            .map_err(|e| ChildError::io("hostname", format!("domainname {d:?}"), e))?;
    }
    Ok(())
}

/// Writes the spec's sysctls through `/proc/sys`, which shows the writer's own (new) network
/// and IPC namespaces; done before `pivot_root`, while the agent's `/proc` is still reachable.
pub(crate) fn apply_sysctls(sysctl: &[(String, String)]) -> StepResult {
    for (key, value) in sysctl {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        fs::write(&path, value)
            .map_err(|e| ChildError::io("sysctl", format!("{key} = {value:?}"), e))?;
    }
    Ok(())
}

/// The last steps, in the only order that works: rlimits (raising needs root), user and
/// groups (keeping capabilities across setuid), cwd as the user, the executable's lookup,
/// no_new_privs, capabilities, seccomp, `execve`.
pub(crate) fn finalize_and_exec(
    p: &ProcessPlan,
    seccomp: Option<&SeccompProgram>,
) -> StepResult<Infallible> {
    set_rlimits(&p.rlimits)?;
    let env = env_with_home(p);
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while this process
    // still has it (as runc does); the filter must then allow the few calls that follow.
    if let (Some(filter), false) = (seccomp, p.no_new_privileges) {
        filter.install()?;
    }
    if let Some(caps) = &p.caps {
        drop_bounding(&caps.bounding)?;
    }
    set_user(p)?;
    umask(Mode::from_bits_truncate(p.umask));
    change_to_cwd(p)?;
    let exe = resolve_executable(&p.arg0, &p.path_var)?;
    if p.no_new_privileges {
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| ChildError::errno("no_new_privs", "prctl(PR_SET_NO_NEW_PRIVS)", e))?;
    }
    if let Some(caps) = &p.caps {
        set_capabilities(caps)?;
    }
    if let (Some(filter), true) = (seccomp, p.no_new_privileges) {
        filter.install()?;
    }
    let err = match execve(&exe, &p.args, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let shown = exe.to_string_lossy().into_owned();
    Err(match err {
        Errno::ENOENT => ChildError {
            kind: ChildErrorKind::NotFound,
            step: "exec".into(),
            message: format!("{shown} (or its interpreter)"),
        },
        Errno::EACCES | Errno::EPERM => ChildError {
            kind: ChildErrorKind::Permission,
            step: "exec".into(),
            message: shown,
        },
        e => ChildError::errno("exec", format!("execve {shown}"), e),
    })
}

/// `chdir` to the cwd as the user (the lookup checks the user's search permission on each
/// directory), resolved inside the container's root without magic links: a cwd of
/// `/proc/self/fd/N` would reach a directory fd of the agent this process still holds until
/// `execve` (runc's CVE-2024-21626).
fn change_to_cwd(p: &ProcessPlan) -> StepResult {
    let err = |e| {
        ChildError::errno(
            "cwd",
            format!("chdir {} as uid {}", p.cwd.display(), p.uid),
            e,
        )
    };
    let root = RootDir::open(Path::new("/")).map_err(err)?;
    let dir = root.resolve_dir(&p.cwd).map_err(err)?;
    rustix::process::fchdir(&dir).map_err(|e| err(Errno::from_raw(e.raw_os_error())))
}

/// Applies `process.rlimits` (before dropping privileges: raising a hard limit needs them).
fn set_rlimits(rlimits: &[(Resource, u64, u64)]) -> StepResult {
    for (res, soft, hard) in rlimits {
        setrlimit(*res, *soft, *hard).map_err(|e| {
            ChildError::errno("rlimits", format!("setrlimit({res:?}, {soft}, {hard})"), e)
        })?;
    }
    Ok(())
}

/// The environment, plus `HOME` from the container's `/etc/passwd` (or `/`) when unset.
fn env_with_home(p: &ProcessPlan) -> Vec<CString> {
    let mut env = p.env.clone();
    if !p.has_home {
        let home = fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|t| home_from_passwd(&t, p.uid))
            .unwrap_or_else(|| "/".into());
        if let Ok(c) = CString::new(format!("HOME={home}")) {
            env.push(c);
        }
    }
    env
}

/// Drops from the bounding set what the spec leaves out (needs CAP_SETPCAP: before setuid).
fn drop_bounding(keep: &CapsHashSet) -> StepResult {
    let current = caps::read(None, CapSet::Bounding)
        .map_err(|e| ChildError::msg("capabilities", format!("reading the bounding set: {e}")))?;
    for cap in current.difference(keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(|e| {
            ChildError::msg("capabilities", format!("dropping {cap} from bounding: {e}"))
        })?;
    }
    Ok(())
}

/// Groups, gid, uid, keeping the permitted capabilities across the uid change so the spec's
/// sets can be applied after it.
fn set_user(p: &ProcessPlan) -> StepResult {
    let step = "user";
    nix::sys::prctl::set_keepcaps(true)
        .map_err(|e| ChildError::errno(step, "prctl(PR_SET_KEEPCAPS)", e))?;
    let groups: Vec<Gid> = p
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups)
        .map_err(|e| ChildError::errno(step, format!("setgroups({:?})", p.additional_gids), e))?;
    let gid = Gid::from_raw(p.gid);
    setresgid(gid, gid, gid)
        .map_err(|e| ChildError::errno(step, format!("setresgid({})", p.gid), e))?;
    let uid = Uid::from_raw(p.uid);
    setresuid(uid, uid, uid)
        .map_err(|e| ChildError::errno(step, format!("setresuid({})", p.uid), e))?;
    nix::sys::prctl::set_keepcaps(false)
        .map_err(|e| ChildError::errno(step, "prctl(PR_SET_KEEPCAPS, 0)", e))
}

/// Sets inheritable, effective, permitted and ambient, in the order the kernel allows
/// (inheritable while CAP_SETPCAP is still effective; effective before shrinking permitted).
/// Capabilities this kernel does not know are left out.
fn set_capabilities(c: &CapsPlan) -> StepResult {
    let step = "capabilities";
    let known = caps::runtime::thread_all_supported();
    let only_known = |s: &CapsHashSet| -> CapsHashSet { s.intersection(&known).copied().collect() };
    // Effective may be empty after setuid to a non-root user: take it back from permitted
    // first so inheritable can be set.
    let permitted_now = caps::read(None, CapSet::Permitted)
        .map_err(|e| ChildError::msg(step, format!("reading permitted: {e}")))?;
    caps::set(None, CapSet::Effective, &permitted_now)
        .map_err(|e| ChildError::msg(step, format!("restoring effective: {e}")))?;
    for (set, name, value) in [
        (CapSet::Inheritable, "inheritable", &c.inheritable),
        (CapSet::Effective, "effective", &c.effective),
        (CapSet::Permitted, "permitted", &c.permitted),
    ] {
        caps::set(None, set, &only_known(value))
            .map_err(|e| ChildError::msg(step, format!("setting {name}: {e}")))?;
    }
    let ambient = only_known(&c.ambient);
    if !ambient.is_empty() {
        caps::set(None, CapSet::Ambient, &ambient)
            .map_err(|e| ChildError::msg(step, format!("setting ambient: {e}")))?;
    }
    Ok(())
}

/// Finds the executable as `execvp` would, with the spec's `PATH`, so a missing one is
/// reported by name ("executable not found: nope") rather than as a bare ENOENT.
fn resolve_executable(arg0: &str, path_var: &str) -> StepResult<CString> {
    let not_found = || ChildError {
        kind: ChildErrorKind::NotFound,
        step: "exec".into(),
        message: arg0.to_string(),
    };
    let denied = |path: &Path| ChildError {
        kind: ChildErrorKind::Permission,
        step: "exec".into(),
        message: path.display().to_string(),
    };
    let candidates: Vec<PathBuf> = if arg0.contains('/') {
        vec![PathBuf::from(arg0)]
    } else {
        path_var
            .split(':')
            .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(arg0))
            .collect()
    };
    let mut first_denied = None;
    for path in candidates {
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let executable = meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
            && access(&path, AccessFlags::X_OK).is_ok();
        if executable {
            return CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| ChildError::msg("exec", "executable path contains NUL"));
        }
        first_denied.get_or_insert(path);
    }
    Err(match first_denied {
        Some(path) => denied(&path),
        None => not_found(),
    })
}
