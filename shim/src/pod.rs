//! Where a pod's shim and VM live, derived only from (containerd address, namespace, pod id),
//! so that every `start` of a pod's containers finds the same shim, and `delete` after a
//! crashed shim finds the VMM's pid file.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Container annotation (set by CRI) naming the pod a container belongs to.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Pod resources CRI (containerd 1.7+) puts on the sandbox container.
pub const SANDBOX_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Pod state directories (the VMM's sockets, console log, pid file and slot disks) go under
/// this directory, one per pod. Short, so unix socket paths stay under 108 bytes.
pub const STATE_ROOT: &str = "/run/microvm-shim";

/// The VMM's pid, for `delete` after the shim itself died.
pub const VMM_PID_FILE: &str = "vmm.pid";
pub const CONSOLE_LOG: &str = "console.log";

/// The pod a container belongs to: its sandbox-id annotation, else the container itself.
pub fn grouping(spec: &serde_json::Value, container_id: &str) -> String {
    spec.pointer("/annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(container_id)
        .to_string()
}

/// The pod's cgroup parent, relative to the cgroup hierarchy, from the sandbox container's
/// `linux.cgroupsPath` as containerd's CRI plugin writes it: `/<cgroup parent>/<sandbox id>`
/// (cgroupfs driver), or `<slice>:cri-containerd:<sandbox id>` when kubelet's cgroup parent is
/// a systemd slice (systemd driver), whose folder is the slice's path ([`slice_path`]). The
/// jailed VM's leaf is made there, so the pod's cgroup counts the VM: what containerd's
/// PodSandboxStats reads (cgroupfs driver) and what kubelet's cAdvisor reads (either). The path
/// is the pod spec's, so hostile: the jail takes only plain components (`..` is refused, and the
/// VM does not start). Anything else: `None`, the VM stays in the `microvm` group.
pub fn cgroup_parent(spec: &serde_json::Value) -> Option<String> {
    let path = spec.pointer("/linux/cgroupsPath")?.as_str()?;
    let parent = match path.strip_prefix('/') {
        Some(cgroupfs) => cgroupfs.rsplit_once('/')?.0.to_string(),
        None => slice_path(path.split_once(':')?.0)?,
    };
    (!parent.is_empty()).then_some(parent)
}

/// Where systemd keeps a slice: each `-` in its name is a level down, so `a-b-c.slice` is
/// `a.slice/a-b.slice/a-b-c.slice`. `None` for the root slice (`-.slice`) and for a name systemd
/// refuses (no `.slice` suffix, an empty level, a `/`).
pub fn slice_path(slice: &str) -> Option<String> {
    let name = slice.strip_suffix(".slice")?;
    if name.is_empty() || name.contains('/') || name.split('-').any(str::is_empty) {
        return None;
    }
    let mut levels: Vec<String> = Vec::new();
    for (end, _) in name.match_indices('-').chain([(name.len(), "")]) {
        levels.push(format!("{}.slice", &name[..end]));
    }
    Some(levels.join("/"))
}

/// Reads `<bundle>/config.json`.
pub fn read_spec(bundle: &Path) -> std::io::Result<(Vec<u8>, serde_json::Value)> {
    let bytes = std::fs::read(bundle.join("config.json"))?;
    let v = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
    Ok((bytes, v))
}

/// The shim's socket address for a pod (the same formula as containerd-shim's helper).
pub fn shim_address(containerd_address: &str, namespace: &str, grouping: &str) -> String {
    containerd_shim::socket_address(containerd_address, namespace, grouping)
}

/// The pod's state directory, keyed by its shim socket address.
pub fn state_dir(shim_address: &str) -> PathBuf {
    let digest = Sha256::digest(shim_address.as_bytes());
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(STATE_ROOT).join(key)
}

/// Creates `dir` (and missing parents) and makes it 0700, whatever the umask: the pod's state
/// (the VMM's sockets, disks, console) is the shim's only.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes a state file 0600, whatever the umask (and an existing file's mode).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)
}

/// The socket file behind a `unix://` address.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// A pod VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub cpus: u8,
    pub memory_mib: u64,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the pod asks for a VM of {cpus} vCPUs and {memory_mib} MiB (the shim config's cpus = {base_cpus} \
     and memory_mib = {base_mib} plus the pod's limits: {from}); the shim config allows at most \
     max_cpus = {max_cpus} and max_memory_mib = {max_mib}"
)]
pub struct TooLarge {
    cpus: u64,
    memory_mib: u64,
    base_cpus: u8,
    base_mib: u64,
    max_cpus: u8,
    max_mib: u64,
    from: &'static str,
}

/// The pod VM's size: the config's base plus what the pod's own limits ask for, from CRI's
/// sandbox annotations, else the container's own `linux.resources` (for a pod of one
/// container started by `ctr`). Refused above the config's `max_cpus` / `max_memory_mib`:
/// annotations are written by whoever writes the pod.
pub fn vm_size(
    cfg: &crate::config::ShimConfig,
    spec: &serde_json::Value,
) -> Result<VmSize, TooLarge> {
    let ann = |k: &str| {
        spec.pointer("/annotations")
            .and_then(|a| a.get(k))
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<i64>().ok())
    };
    let res = |p: &str| spec.pointer(p).and_then(|v| v.as_i64());
    let from_annotations =
        ann(SANDBOX_MEMORY_ANNOTATION).is_some() || ann(SANDBOX_CPU_QUOTA_ANNOTATION).is_some();
    let memory = ann(SANDBOX_MEMORY_ANNOTATION).or_else(|| res("/linux/resources/memory/limit"));
    let quota = ann(SANDBOX_CPU_QUOTA_ANNOTATION).or_else(|| res("/linux/resources/cpu/quota"));
    let period = ann(SANDBOX_CPU_PERIOD_ANNOTATION)
        .or_else(|| res("/linux/resources/cpu/period"))
        .unwrap_or(100_000);
    let extra_cpus = match quota {
        Some(q) if q > 0 && period > 0 => (q as u64).div_ceil(period as u64),
        _ => 0,
    };
    let extra_mib = match memory {
        Some(m) if m > 0 => (m as u64).div_ceil(1 << 20),
        _ => 0,
    };
    let cpus = u64::from(cfg.cpus).saturating_add(extra_cpus);
    let memory_mib = cfg.memory_mib.saturating_add(extra_mib);
    if cpus > u64::from(cfg.max_cpus) || memory_mib > cfg.max_memory_mib {
        return Err(TooLarge {
            cpus,
            memory_mib,
            base_cpus: cfg.cpus,
            base_mib: cfg.memory_mib,
            max_cpus: cfg.max_cpus,
            max_mib: cfg.max_memory_mib,
            from: if from_annotations {
                "io.kubernetes.cri.sandbox-memory / -cpu-quota / -cpu-period"
            } else {
                "the container's linux.resources"
            },
        });
    }
    Ok(VmSize {
        cpus: cpus as u8,
        memory_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_slice_is_a_folder_per_dash() {
        assert_eq!(slice_path("a.slice").as_deref(), Some("a.slice"));
        assert_eq!(
            slice_path("a-b-c.slice").as_deref(),
            Some("a.slice/a-b.slice/a-b-c.slice")
        );
        for refused in [
            "-.slice",
            "-a.slice",
            "a-.slice",
            "a--b.slice",
            "a/b.slice",
            "a",
            "",
        ] {
            assert_eq!(slice_path(refused), None, "{refused:?}");
        }
        // `..` stays one plain name: no way up.
        assert_eq!(slice_path("...slice").as_deref(), Some("...slice"));
    }

    #[test]
    fn the_cgroup_parent_is_the_sandbox_cgroups_path_minus_its_id() {
        let spec = |p: &str| json!({"linux": {"cgroupsPath": p}});
        assert_eq!(
            cgroup_parent(&spec("/kubepods/burstable/pod-1/abc")).as_deref(),
            Some("kubepods/burstable/pod-1")
        );
        assert_eq!(
            cgroup_parent(&spec("/k8s.io/abc")).as_deref(),
            Some("k8s.io")
        );
        // systemd's form: the slice's folder.
        assert_eq!(
            cgroup_parent(&spec("kubepods-besteffort-pod1.slice:cri-containerd:abc")).as_deref(),
            Some("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice")
        );
        assert_eq!(
            cgroup_parent(&spec("kubepods.slice:cri-containerd:abc")).as_deref(),
            Some("kubepods.slice")
        );
        // The root slice, a slice systemd refuses, a bare id, no parent, no linux section: the
        // default group.
        assert_eq!(cgroup_parent(&spec("-.slice:cri-containerd:abc")), None);
        assert_eq!(cgroup_parent(&spec("a--b.slice:cri-containerd:abc")), None);
        assert_eq!(cgroup_parent(&spec("kubepods:cri-containerd:abc")), None);
        assert_eq!(cgroup_parent(&spec("/abc")), None);
        assert_eq!(cgroup_parent(&spec("abc")), None);
        assert_eq!(cgroup_parent(&json!({})), None);
        // Passed on as written: the jail refuses `..` (jail/tests/cgroup.rs).
        assert_eq!(
            cgroup_parent(&spec("/../../etc/abc")).as_deref(),
            Some("../../etc")
        );
    }

    #[test]
    fn containers_group_by_sandbox_id() {
        let s = json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod1"}});
        assert_eq!(grouping(&s, "c1"), "pod1");
        assert_eq!(grouping(&json!({}), "c1"), "c1");
        let a = shim_address("/run/c.sock", "default", "pod1");
        assert_eq!(a, shim_address("/run/c.sock", "default", "pod1"));
        assert_ne!(a, shim_address("/run/c.sock", "k8s.io", "pod1"));
        assert!(a.starts_with("unix:///run/containerd/s/"), "{a}");
        let d = state_dir(&a);
        assert_eq!(d, state_dir(&a));
        assert!(d.join("vsock.sock_1024").as_os_str().len() < 100);
    }

    #[test]
    fn state_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let state = dir.path().join("root/pod");
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        // An existing directory left open by an older shim is closed too.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        let pid = state.join(VMM_PID_FILE);
        std::fs::write(&pid, "1").unwrap();
        std::fs::set_permissions(&pid, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&pid, b"42").unwrap();
        assert_eq!(mode(&pid), 0o600);
        assert_eq!(std::fs::read_to_string(&pid).unwrap(), "42");
    }

    #[test]
    fn pod_size_from_annotations_or_limits() {
        let cfg = crate::config::ShimConfig::default();
        let size = |s: serde_json::Value| vm_size(&cfg, &s).map(|v| (v.cpus, v.memory_mib));
        let s = json!({"annotations": {
            SANDBOX_MEMORY_ANNOTATION: "268435456",
            SANDBOX_CPU_QUOTA_ANNOTATION: "150000",
            SANDBOX_CPU_PERIOD_ANNOTATION: "100000"}});
        assert_eq!(size(s).unwrap(), (3, 512));
        let s = json!({"linux": {"resources": {"memory": {"limit": 1048577}}}});
        assert_eq!(size(s).unwrap(), (1, 258));
        assert_eq!(size(json!({})).unwrap(), (1, 256));
        let s = json!({"annotations": {SANDBOX_MEMORY_ANNOTATION: "-5"}});
        assert_eq!(size(s).unwrap(), (1, 256));
    }

    /// The annotations are the pod author's: a pod asking for more than the config's maximum
    /// is refused, not capped by the host's RAM only.
    #[test]
    fn a_pod_above_the_configured_maximum_is_refused() {
        let cfg = crate::config::ShimConfig::default();
        let s = json!({"annotations": {SANDBOX_MEMORY_ANNOTATION: "1099511627776"}});
        let e = vm_size(&cfg, &s).unwrap_err().to_string();
        assert!(
            e.contains("max_memory_mib = 8192") && e.contains("1048832 MiB"),
            "{e}"
        );
        assert!(e.contains("sandbox-memory"), "{e}");
        let s = json!({"annotations": {
            SANDBOX_CPU_QUOTA_ANNOTATION: "9223372036854775807",
            SANDBOX_CPU_PERIOD_ANNOTATION: "1"}});
        let e = vm_size(&cfg, &s).unwrap_err().to_string();
        assert!(e.contains("max_cpus = 8"), "{e}");
        let s = json!({"linux": {"resources": {"cpu": {"quota": 800000, "period": 100000}}}});
        let e = vm_size(&cfg, &s).unwrap_err().to_string();
        assert!(
            e.contains("9 vCPUs") && e.contains("linux.resources"),
            "{e}"
        );
        // At the maximum exactly: fine.
        let s = json!({"annotations": {SANDBOX_MEMORY_ANNOTATION: (7936u64 << 20).to_string()}});
        assert_eq!(vm_size(&cfg, &s).unwrap().memory_mib, 8192);
    }
}
