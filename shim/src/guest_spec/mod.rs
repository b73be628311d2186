//! The OCI spec as the guest gets it: namespaces with a host path are handled on the host
//! ([`namespaces`]); host bind mounts are attached to the pod's share by [`crate::mounts`].

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

/// The guest's spec of a container: namespaces rewritten (see [`namespaces`]).
pub fn guest_spec(
    spec: &serde_json::Value,
    pod: &PodView<'_>,
) -> Result<GuestSpec, NamespaceError> {
    let mut spec = spec.clone();
    let role = Role::of(&spec);
    let host_netns = namespaces::rewrite(&mut spec, role, pod)?;
    Ok(GuestSpec { spec, host_netns })
}

/// The guest's block device of slot disk `slot`.
pub fn guest_disk(slot: usize) -> String {
    format!("/dev/vd{}", (b'a' + slot as u8) as char)
}

#[cfg(test)]
mod tests;
