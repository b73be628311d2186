//! The container process itself: what the spec's `process` asks for (user, groups, umask,
//! rlimits, capabilities, no_new_privs, oom score, env, cwd), validated in the parent.
//! `process_setup.rs` applies it in the child.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::PathBuf;

use caps::{Capability as Cap, CapsHashSet};
use nix::sys::resource::Resource;
use oci_spec::runtime::{Capability, LinuxCapabilities, PosixRlimitType, Process};

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
