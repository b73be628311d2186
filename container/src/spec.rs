//! Spec validation: everything checkable without touching the system is checked here, in the
//! parent, at `create`, and turned into plans the child only has to carry out.

use std::collections::HashMap;

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::mounts::{self, RootfsPlan};
use crate::namespaces::{self, NamespacePlan};
use crate::process::ProcessPlan;
use crate::seccomp::{self, SeccompProgram};
use crate::Error;

/// A validated spec.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub init: ProcessPlan,
    pub namespaces: NamespacePlan,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub rootfs: RootfsPlan,
    pub sysctl: Vec<(String, String)>,
    pub seccomp: Option<SeccompProgram>,
}

/// Parses a runtime spec (`config.json` text), with the JSON error's line and column.
pub fn parse_spec(json: &str) -> Result<Spec, Error> {
    serde_json::from_str(json).map_err(|e| Error::InvalidSpec(format!("config.json: {e}")))
}

/// A container id: 1 to 64 of `[A-Za-z0-9_.-]`, and not `.` or `..` (it names a directory).
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

/// Validates the whole spec. `join` is the agent's list of namespaces to join.
pub(crate) fn prepare(
    spec: &Spec,
    join: &[(LinuxNamespaceType, std::path::PathBuf)],
) -> Result<Prepared, Error> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("process is missing".into()))?;
    let init = ProcessPlan::from_spec(process, "process")?;
    let default_linux = oci_spec::runtime::Linux::default();
    let linux = spec.linux().as_ref().unwrap_or(&default_linux);

    let unsupported = |what: &str| Err(Error::Unsupported(what.to_string()));
    if spec.hooks().is_some() {
        return unsupported("hooks (the guest has no runtime-namespace hooks)");
    }
    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return unsupported("linux.uidMappings/gidMappings (no user namespaces)");
    }
    for (set, what) in [
        (linux.intel_rdt().is_some(), "linux.intelRdt"),
        (linux.personality().is_some(), "linux.personality"),
        (linux.memory_policy().is_some(), "linux.memoryPolicy"),
        (linux.time_offsets().is_some(), "linux.timeOffsets"),
        (linux.net_devices().is_some(), "linux.netDevices"),
    ] {
        if set {
            return unsupported(what);
        }
    }

    let ns = namespaces::plan(linux.namespaces().as_deref().unwrap_or_default(), join)?;
    let has = |f: CloneFlags| ns.all.contains(f);
    if spec.hostname().as_ref().is_some_and(|h| !h.is_empty()) && !has(CloneFlags::CLONE_NEWUTS) {
        return Err(Error::InvalidSpec(
            "hostname is set but there is no uts namespace".into(),
        ));
    }
    if spec.domainname().as_ref().is_some_and(|h| !h.is_empty()) && !has(CloneFlags::CLONE_NEWUTS) {
        return Err(Error::InvalidSpec(
            "domainname is set but there is no uts namespace".into(),
        ));
    }
    let sysctl = check_sysctls(linux.sysctl().as_ref(), ns.all)?;

    let root = spec.root().as_ref();
    let rootfs = mounts::plan_rootfs(
        spec.mounts().as_deref().unwrap_or_default(),
        linux.devices().as_deref().unwrap_or_default(),
        linux.masked_paths().as_deref().unwrap_or_default(),
        linux.readonly_paths().as_deref().unwrap_or_default(),
        root.and_then(|r| r.readonly()).unwrap_or(false),
        linux.rootfs_propagation().as_deref(),
    )?;
    if let Some(r) = linux.resources() {
        crate::cgroup::resource_writes(r)?;
    }
    let seccomp = linux.seccomp().as_ref().map(seccomp::compile).transpose()?;
    Ok(Prepared {
        init,
        namespaces: ns,
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        domainname: spec.domainname().clone().filter(|h| !h.is_empty()),
        rootfs,
        sysctl,
        seccomp,
    })
}

/// Which namespace a sysctl belongs to; `None` for ones that are VM-wide.
pub(crate) fn sysctl_namespace(key: &str) -> Option<CloneFlags> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        Some(CloneFlags::CLONE_NEWIPC)
    } else if key.starts_with("net.") {
        Some(CloneFlags::CLONE_NEWNET)
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some(CloneFlags::CLONE_NEWUTS)
    } else {
        None
    }
}

/// Only namespaced sysctls of namespaces the container has (as runc): the others would change
/// the whole VM, which other containers of the pod share.
fn check_sysctls(
    sysctl: Option<&HashMap<String, String>>,
    namespaces: CloneFlags,
) -> Result<Vec<(String, String)>, Error> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, value) in sysctl.into_iter().flatten() {
        let bad = key.is_empty()
            || key.contains("..")
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if bad {
            return Err(Error::InvalidSpec(format!(
                "linux.sysctl: bad name {key:?}"
            )));
        }
        match sysctl_namespace(key) {
            Some(ns) if namespaces.contains(ns) => out.push((key.clone(), value.clone())),
            Some(ns) => {
                return Err(Error::InvalidSpec(format!(
                    "linux.sysctl: {key} needs the container to have its own {ns:?} namespace"
                )))
            }
            None => {
                return Err(Error::InvalidSpec(format!(
                    "linux.sysctl: {key} is not namespaced (it would change the whole VM)"
                )))
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "x.y_z", &"a".repeat(64)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", &"a".repeat(65), "ünï"] {
            assert!(
                matches!(validate_id(bad), Err(Error::InvalidId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_json_names_line_and_column() {
        let e = parse_spec("{\"ociVersion\": \"1.0.2\",\n \"process\": [}").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("invalid spec: config.json:"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        let e = parse_spec(r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":0,"gid":0},"capabilities":{"bounding":["CAP_NOPE"]}}}"#).unwrap_err();
        assert!(e.to_string().contains("CAP_NOPE"), "{e}");
    }

    #[test]
    fn default_spec_is_valid() {
        let p = prepare(&Spec::default(), &[]).unwrap();
        assert_eq!(p.hostname.as_deref(), Some("youki"));
        assert!(p.namespaces.new_pid);
        assert!(p.rootfs.readonly_root);
        assert!(p.seccomp.is_none());
    }

    #[test]
    fn inconsistent_specs_are_rejected() {
        let mut spec = Spec::default();
        spec.set_process(None);
        assert!(prepare(&spec, &[])
            .unwrap_err()
            .to_string()
            .contains("process is missing"));

        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_namespaces(Some(
            oci_spec::runtime::get_default_namespaces()
                .into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Uts)
                .collect(),
        ));
        spec.set_linux(Some(linux));
        assert!(prepare(&spec, &[])
            .unwrap_err()
            .to_string()
            .contains("no uts namespace"));

        let mut spec = Spec::default();
        spec.set_hooks(Some(Default::default()));
        assert!(matches!(prepare(&spec, &[]), Err(Error::Unsupported(_))));
    }

    #[test]
    fn sysctls_must_be_namespaced_and_owned() {
        let all = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC;
        let map = |k: &str| HashMap::from([(k.to_string(), "1".to_string())]);
        assert_eq!(
            check_sysctls(Some(&map("net.ipv4.ip_forward")), all).unwrap(),
            vec![("net.ipv4.ip_forward".to_string(), "1".to_string())]
        );
        assert!(check_sysctls(Some(&map("kernel.shmmax")), all).is_ok());
        assert!(check_sysctls(Some(&map("vm.overcommit_memory")), all)
            .unwrap_err()
            .to_string()
            .contains("not namespaced"));
        assert!(check_sysctls(Some(&map("net.core.somaxconn")), CloneFlags::CLONE_NEWIPC).is_err());
        assert!(check_sysctls(Some(&map("net/../../x")), all).is_err());
    }
}
