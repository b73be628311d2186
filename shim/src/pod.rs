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

/// The socket file behind a `unix://` address.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Extra VM size the pod's own limits ask for: (vCPUs, MiB). From CRI's sandbox annotations,
/// else the container's own `linux.resources` (for a pod of one container started by `ctr`).
pub fn pod_resources(spec: &serde_json::Value) -> (u8, u64) {
    let ann = |k: &str| {
        spec.pointer("/annotations")
            .and_then(|a| a.get(k))
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<i64>().ok())
    };
    let res = |p: &str| spec.pointer(p).and_then(|v| v.as_i64());
    let memory = ann(SANDBOX_MEMORY_ANNOTATION).or_else(|| res("/linux/resources/memory/limit"));
    let quota = ann(SANDBOX_CPU_QUOTA_ANNOTATION).or_else(|| res("/linux/resources/cpu/quota"));
    let period = ann(SANDBOX_CPU_PERIOD_ANNOTATION)
        .or_else(|| res("/linux/resources/cpu/period"))
        .unwrap_or(100_000);
    let cpus = match quota {
        Some(q) if q > 0 && period > 0 => (q as u64).div_ceil(period as u64).min(64) as u8,
        _ => 0,
    };
    let mib = match memory {
        Some(m) if m > 0 => (m as u64).div_ceil(1 << 20),
        _ => 0,
    };
    (cpus, mib)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn pod_size_from_annotations_or_limits() {
        let s = json!({"annotations": {
            SANDBOX_MEMORY_ANNOTATION: "268435456",
            SANDBOX_CPU_QUOTA_ANNOTATION: "150000",
            SANDBOX_CPU_PERIOD_ANNOTATION: "100000"}});
        assert_eq!(pod_resources(&s), (2, 256));
        let s = json!({"linux": {"resources": {"memory": {"limit": 1048577}}}});
        assert_eq!(pod_resources(&s), (0, 2));
        assert_eq!(pod_resources(&json!({})), (0, 0));
    }
}
