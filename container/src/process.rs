//! The container process itself: what the spec's `process` asks for (user, groups, umask,
//! rlimits, capabilities, no_new_privs, oom score, env, cwd), validated in the parent and
//! applied by the child in an order that keeps each step possible, ending in `execve`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability as Cap, CapsHashSet};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{access, chdir, dup2, execve, setresgid, setresuid, setsid, AccessFlags};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Capability, LinuxCapabilities, PosixRlimitType, Process};

use crate::child::{ChildError, ChildErrorKind, StepResult};
use crate::seccomp::SeccompProgram;
use crate::Error;

/// `PATH` when the process's environment has none (runc's default).
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The umask when the spec gives none (runc's default).
const DEFAULT_UMASK: u32 = 0o022;
/// The kernel's limit on supplementary groups (`NGROUPS_MAX`).
const NGROUPS_MAX: usize = 65536;

/// A validated `process`, ready for the child.
#[derive(Debug, Clone)]
pub(crate) struct ProcessPlan {
    pub args: Vec<CString>,
    /// `args[0]` as given, for lookup and error messages.
    pub arg0: String,
    pub env: Vec<CString>,
    /// The `PATH` the executable is looked up in (from `env`, else [`DEFAULT_PATH`]).
    pub path_var: String,
    pub has_home: bool,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: u32,
    pub rlimits: Vec<(Resource, u64, u64)>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
    /// `None`: the spec gives no capabilities, the process keeps root's full set.
    pub caps: Option<CapsPlan>,
}

/// The five capability sets of `process.capabilities`, mapped to the `caps` crate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CapsPlan {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

impl ProcessPlan {
    /// Validates `process` (`what` names it in errors, e.g. "process").
    pub fn from_spec(p: &Process, what: &str) -> Result<ProcessPlan, Error> {
        let invalid = |msg: String| Error::InvalidSpec(format!("{what}.{msg}"));
        let args = p.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(invalid(
                "args: empty; the first argument is the executable".into(),
            ));
        }
        let c_args = to_cstrings(&args).map_err(|i| invalid(format!("args[{i}] contains NUL")))?;
        let env = p.env().clone().unwrap_or_default();
        for (i, e) in env.iter().enumerate() {
            if !e.contains('=') || e.starts_with('=') {
                return Err(invalid(format!("env[{i}] {e:?} is not NAME=VALUE")));
            }
        }
        let c_env = to_cstrings(&env).map_err(|i| invalid(format!("env[{i}] contains NUL")))?;
        let path_var = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_string();
        let has_home = env.iter().any(|e| e.starts_with("HOME="));
        if !p.cwd().is_absolute() {
            return Err(invalid(format!(
                "cwd {} is not absolute",
                p.cwd().display()
            )));
        }
        let user = p.user();
        if user.uid() == u32::MAX || user.gid() == u32::MAX {
            return Err(invalid(format!(
                "user: uid {} / gid {}: 4294967295 is not a valid id",
                user.uid(),
                user.gid()
            )));
        }
        let additional_gids = user.additional_gids().clone().unwrap_or_default();
        if additional_gids.len() > NGROUPS_MAX {
            return Err(invalid(format!(
                "user.additionalGids: {} groups, the kernel allows {NGROUPS_MAX}",
                additional_gids.len()
            )));
        }
        if additional_gids.contains(&u32::MAX) {
            return Err(invalid(
                "user.additionalGids: 4294967295 is not a valid group id".into(),
            ));
        }
        let umask = user.umask().unwrap_or(DEFAULT_UMASK);
        if umask > 0o777 {
            return Err(invalid(format!("user.umask {umask:#o} is above 0777")));
        }
        let mut rlimits = Vec::new();
        for r in p.rlimits().iter().flatten() {
            if r.soft() > r.hard() {
                return Err(invalid(format!(
                    "rlimits: {} soft limit {} is above the hard limit {}",
                    r.typ(),
                    r.soft(),
                    r.hard()
                )));
            }
            if rlimits
                .iter()
                .any(|(res, _, _)| *res == rlimit_resource(r.typ()))
            {
                return Err(invalid(format!("rlimits: {} is given twice", r.typ())));
            }
            rlimits.push((rlimit_resource(r.typ()), r.soft(), r.hard()));
        }
        if let Some(adj) = p.oom_score_adj() {
            if !(-1000..=1000).contains(&adj) {
                return Err(invalid(format!(
                    "oomScoreAdj {adj} is outside -1000..=1000"
                )));
            }
        }
        let caps = p
            .capabilities()
            .as_ref()
            .map(caps_plan)
            .transpose()
            .map_err(|m| invalid(format!("capabilities: {m}")))?;
        if p.scheduler().is_some() {
            return Err(Error::Unsupported(format!("{what}.scheduler")));
        }
        if p.io_priority().is_some() {
            return Err(Error::Unsupported(format!("{what}.ioPriority")));
        }
        if p.exec_cpu_affinity().is_some() {
            return Err(Error::Unsupported(format!("{what}.execCPUAffinity")));
        }
        if p.apparmor_profile().is_some() || p.selinux_label().is_some() {
            tracing::debug!("{what}: no LSM in the guest, apparmorProfile/selinuxLabel ignored");
        }
        Ok(ProcessPlan {
            args: c_args,
            arg0: args[0].clone(),
            env: c_env,
            path_var,
            has_home,
            cwd: p.cwd().clone(),
            uid: user.uid(),
            gid: user.gid(),
            additional_gids,
            umask,
            rlimits,
            no_new_privileges: p.no_new_privileges().unwrap_or(false),
            oom_score_adj: p.oom_score_adj(),
            caps,
        })
    }
}

/// Strings to C strings; on a NUL byte, the index of the bad one.
fn to_cstrings(v: &[String]) -> Result<Vec<CString>, usize> {
    v.iter()
        .enumerate()
        .map(|(i, s)| CString::new(s.as_bytes()).map_err(|_| i))
        .collect()
}

/// The kernel resource for an OCI rlimit name.
pub(crate) fn rlimit_resource(t: PosixRlimitType) -> Resource {
    match t {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// The `caps` crate's capability for an OCI capability name.
pub(crate) fn capability(c: Capability) -> Cap {
    match c {
        Capability::AuditControl => Cap::CAP_AUDIT_CONTROL,
        Capability::AuditRead => Cap::CAP_AUDIT_READ,
        Capability::AuditWrite => Cap::CAP_AUDIT_WRITE,
        Capability::BlockSuspend => Cap::CAP_BLOCK_SUSPEND,
        Capability::Bpf => Cap::CAP_BPF,
        Capability::CheckpointRestore => Cap::CAP_CHECKPOINT_RESTORE,
        Capability::Chown => Cap::CAP_CHOWN,
        Capability::DacOverride => Cap::CAP_DAC_OVERRIDE,
        Capability::DacReadSearch => Cap::CAP_DAC_READ_SEARCH,
        Capability::Fowner => Cap::CAP_FOWNER,
        Capability::Fsetid => Cap::CAP_FSETID,
        Capability::IpcLock => Cap::CAP_IPC_LOCK,
        Capability::IpcOwner => Cap::CAP_IPC_OWNER,
        Capability::Kill => Cap::CAP_KILL,
        Capability::Lease => Cap::CAP_LEASE,
        Capability::LinuxImmutable => Cap::CAP_LINUX_IMMUTABLE,
        Capability::MacAdmin => Cap::CAP_MAC_ADMIN,
        Capability::MacOverride => Cap::CAP_MAC_OVERRIDE,
        Capability::Mknod => Cap::CAP_MKNOD,
        Capability::NetAdmin => Cap::CAP_NET_ADMIN,
        Capability::NetBindService => Cap::CAP_NET_BIND_SERVICE,
        Capability::NetBroadcast => Cap::CAP_NET_BROADCAST,
        Capability::NetRaw => Cap::CAP_NET_RAW,
        Capability::Perfmon => Cap::CAP_PERFMON,
        Capability::Setgid => Cap::CAP_SETGID,
        Capability::Setfcap => Cap::CAP_SETFCAP,
        Capability::Setpcap => Cap::CAP_SETPCAP,
        Capability::Setuid => Cap::CAP_SETUID,
        Capability::SysAdmin => Cap::CAP_SYS_ADMIN,
        Capability::SysBoot => Cap::CAP_SYS_BOOT,
        Capability::SysChroot => Cap::CAP_SYS_CHROOT,
        Capability::SysModule => Cap::CAP_SYS_MODULE,
        Capability::SysNice => Cap::CAP_SYS_NICE,
        Capability::SysPacct => Cap::CAP_SYS_PACCT,
        Capability::SysPtrace => Cap::CAP_SYS_PTRACE,
        Capability::SysRawio => Cap::CAP_SYS_RAWIO,
        Capability::SysResource => Cap::CAP_SYS_RESOURCE,
        Capability::SysTime => Cap::CAP_SYS_TIME,
        Capability::SysTtyConfig => Cap::CAP_SYS_TTY_CONFIG,
        Capability::Syslog => Cap::CAP_SYSLOG,
        Capability::WakeAlarm => Cap::CAP_WAKE_ALARM,
    }
}

/// Maps the five sets and checks the kernel's rules that would otherwise fail late:
/// effective and ambient within permitted, ambient within inheritable.
pub(crate) fn caps_plan(c: &LinuxCapabilities) -> Result<CapsPlan, String> {
    let map = |s: &Option<HashSet<Capability>>| -> CapsHashSet {
        s.iter().flatten().map(|c| capability(*c)).collect()
    };
    let plan = CapsPlan {
        bounding: map(c.bounding()),
        effective: map(c.effective()),
        permitted: map(c.permitted()),
        inheritable: map(c.inheritable()),
        ambient: map(c.ambient()),
    };
    let missing = |a: &CapsHashSet, b: &CapsHashSet| {
        let mut m: Vec<String> = a.difference(b).map(|c| c.to_string()).collect();
        m.sort();
        m.join(", ")
    };
    if !plan.effective.is_subset(&plan.permitted) {
        return Err(format!(
            "effective has {} which permitted lacks",
            missing(&plan.effective, &plan.permitted)
        ));
    }
    if !plan.ambient.is_subset(&plan.permitted) || !plan.ambient.is_subset(&plan.inheritable) {
        return Err(format!(
            "ambient must be within permitted and inheritable ({} missing)",
            missing(
                &plan.ambient,
                &plan
                    .permitted
                    .intersection(&plan.inheritable)
                    .copied()
                    .collect()
            )
        ));
    }
    Ok(plan)
}

/// The home directory of `uid` in an `/etc/passwd` text.
pub(crate) fn home_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid) && !f[5].is_empty())
            .then(|| f[5].to_string())
    })
}

// ---- child steps ----

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

/// Marks every fd above 2 close-on-exec: whatever the agent had open without `O_CLOEXEC`
/// must not leak into the container. Fds the setup still needs stay usable until `execve`.
pub(crate) fn mark_inherited_fds_cloexec() -> StepResult {
    let entries = fs::read_dir("/proc/self/fd")
        .map_err(|e| ChildError::io("close fds", "reading /proc/self/fd", e))?;
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            Ok(_) | Err(Errno::EBADF) => {} // EBADF: the directory's own fd, closed already
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

/// Creates `cwd` inside the container when it is missing (as runc does), before the root may
/// become read-only.
pub(crate) fn create_cwd(cwd: &Path) -> StepResult {
    if cwd.exists() {
        return Ok(());
    }
    crate::mounts::mkdir_p(cwd)
        .map_err(|e| ChildError::io("cwd", format!("creating cwd {}", cwd.display()), e))
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
    chdir(&p.cwd).map_err(|e| {
        ChildError::errno(
            "cwd",
            format!("chdir {} as uid {}", p.cwd.display(), p.uid),
            e,
        )
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCapabilitiesBuilder, PosixRlimitBuilder, ProcessBuilder, UserBuilder,
    };

    fn process() -> Process {
        ProcessBuilder::default()
            .args(vec!["/bin/sh".to_string()])
            .cwd("/")
            .env(vec!["PATH=/bin".to_string(), "A=b=c".to_string()])
            .build()
            .unwrap()
    }

    #[test]
    fn valid_process_is_planned() {
        let p = ProcessPlan::from_spec(&process(), "process").unwrap();
        assert_eq!(p.arg0, "/bin/sh");
        assert_eq!(p.path_var, "/bin");
        assert!(!p.has_home);
        assert_eq!(p.umask, 0o022);
        assert!(p.caps.unwrap().bounding.contains(&Cap::CAP_KILL));
    }

    #[test]
    fn bad_processes_are_rejected_with_the_field() {
        let mut p = process();
        p.set_args(Some(vec![]));
        let e = ProcessPlan::from_spec(&p, "process")
            .unwrap_err()
            .to_string();
        assert!(e.contains("process.args"), "{e}");

        let mut p = process();
        p.set_env(Some(vec!["NOEQUALS".into()]));
        let e = ProcessPlan::from_spec(&p, "process")
            .unwrap_err()
            .to_string();
        assert!(e.contains("env[0]"), "{e}");

        let mut p = process();
        p.set_cwd("relative".into());
        let e = ProcessPlan::from_spec(&p, "process")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cwd"), "{e}");

        let mut p = process();
        p.set_user(UserBuilder::default().uid(u32::MAX).build().unwrap());
        let e = ProcessPlan::from_spec(&p, "process")
            .unwrap_err()
            .to_string();
        assert!(e.contains("user"), "{e}");

        let mut p = process();
        p.set_rlimits(Some(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(10u64)
            .hard(5u64)
            .build()
            .unwrap()]));
        let e = ProcessPlan::from_spec(&p, "process")
            .unwrap_err()
            .to_string();
        assert!(e.contains("RLIMIT_NOFILE soft limit 10"), "{e}");

        let mut p = process();
        p.set_oom_score_adj(Some(2000));
        assert!(ProcessPlan::from_spec(&p, "process").is_err());
    }

    #[test]
    fn rlimit_names_map_to_kernel_resources() {
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitNofile),
            Resource::RLIMIT_NOFILE
        );
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitNproc),
            Resource::RLIMIT_NPROC
        );
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitRttime),
            Resource::RLIMIT_RTTIME
        );
        let t: PosixRlimitType = serde_json::from_str("\"RLIMIT_CORE\"").unwrap();
        assert_eq!(rlimit_resource(t), Resource::RLIMIT_CORE);
    }

    #[test]
    fn capability_names_map_to_the_same_kernel_names() {
        for name in [
            "CAP_SYS_ADMIN",
            "CAP_NET_BIND_SERVICE",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
            "CAP_KILL",
        ] {
            let oci: Capability = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(capability(oci).to_string(), name);
        }
    }

    #[test]
    fn capability_sets_are_checked() {
        let none = HashSet::<Capability>::new;
        let ok = LinuxCapabilitiesBuilder::default()
            .bounding(
                [Capability::Kill, Capability::Chown]
                    .into_iter()
                    .collect::<HashSet<_>>(),
            )
            .inheritable(none())
            .ambient(none())
            .permitted([Capability::Kill].into_iter().collect::<HashSet<_>>())
            .effective([Capability::Kill].into_iter().collect::<HashSet<_>>())
            .build()
            .unwrap();
        let plan = caps_plan(&ok).unwrap();
        assert!(plan.bounding.contains(&Cap::CAP_CHOWN));
        assert_eq!(plan.effective.len(), 1);

        let bad = LinuxCapabilitiesBuilder::default()
            .permitted(none())
            .inheritable(none())
            .ambient(none())
            .effective([Capability::SysAdmin].into_iter().collect::<HashSet<_>>())
            .build()
            .unwrap();
        let e = caps_plan(&bad).unwrap_err();
        assert!(e.contains("CAP_SYS_ADMIN"), "{e}");

        let bad_ambient = LinuxCapabilitiesBuilder::default()
            .permitted([Capability::Kill].into_iter().collect::<HashSet<_>>())
            .ambient([Capability::Kill].into_iter().collect::<HashSet<_>>())
            .inheritable(none())
            .effective(none())
            .build()
            .unwrap();
        assert!(caps_plan(&bad_ambient).is_err());
    }

    #[test]
    fn home_is_found_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\nbad line\n";
        assert_eq!(home_from_passwd(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(
            home_from_passwd(passwd, 65534).as_deref(),
            Some("/nonexistent")
        );
        assert_eq!(home_from_passwd(passwd, 1000), None);
    }
}
