//! The OCI spec as the guest gets it: what only exists on the host is taken out (host bind
//! mounts) or handled on the host ([`namespaces`] with a host path).

pub mod namespaces;

use std::path::PathBuf;

pub use self::namespaces::{NamespaceError, PodView, Role};

/// A container's spec for the guest, and what of it stays on the host.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: serde_json::Value,
    /// The pod's host network namespace, when this spec named it (a pod sandbox's).
    pub host_netns: Option<PathBuf>,
}

/// The guest's spec of a container: namespaces rewritten (see [`namespaces`]), host bind
/// mounts left out.
pub fn guest_spec(
    spec: &serde_json::Value,
    pod: &PodView<'_>,
) -> Result<GuestSpec, NamespaceError> {
    let mut spec = spec.clone();
    let role = Role::of(&spec);
    let host_netns = namespaces::rewrite(&mut spec, role, pod)?;
    drop_host_mounts(&mut spec);
    Ok(GuestSpec { spec, host_netns })
}

/// Host bind mounts cannot reach the guest (no shared filesystem): they are left out, with a
/// warning. Everything else (proc, sysfs, tmpfs, devpts, mqueue, cgroup) is created in the
/// guest.
fn drop_host_mounts(spec: &mut serde_json::Value) {
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        mounts.retain(|m| {
            let is_bind = m.get("type").and_then(|t| t.as_str()) == Some("bind")
                || m.get("options")
                    .and_then(|o| o.as_array())
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
            if is_bind {
                tracing::warn!(
                    "host bind mount left out (not supported in a microVM yet): {}",
                    m.get("destination").and_then(|d| d.as_str()).unwrap_or("?")
                );
            }
            !is_bind
        });
    }
}

/// The guest's block device of slot disk `slot`.
pub fn guest_disk(slot: usize) -> String {
    format!("/dev/vd{}", (b'a' + slot as u8) as char)
}

#[cfg(test)]
mod tests;
