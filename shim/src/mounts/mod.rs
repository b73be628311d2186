//! Pod volumes: every bind mount of a container's spec (hostPath, emptyDir, configMap,
//! secret, projected, `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`, the termination log,
//! a `ctr run --mount`) reaches the guest live, through the pod's one virtio-fs share.
//!
//! **One share per pod.** The pod's VM is booted with one virtiofsd serving the share root
//! `<pod state>/share` ([`sandbox::share::share_root`], a live share: see `sandbox::share`),
//! which the guest agent mounts once at [`sandbox::share::GUEST_SHARE_DIR`]. Why one share with
//! an entry per source rather than a share (a virtiofsd and a virtio-fs device) per source: the
//! VMM cannot hotplug devices, and a pod's later containers, with their volumes, come after its
//! VM booted; one daemon per pod also bounds the pod's host processes.
//!
//! **Host side** ([`host`]). The share root is a bind mount of itself in the shim's mount
//! namespace, shared with a peer group of its own; virtiofsd's namespace is its slave. Each bind
//! source of a container becomes an entry `<share>/<n>`: the source is opened without following
//! any symbolic link ([`host::open_source`]), its mount cloned (`open_tree`, recursive for
//! `rbind`), the detached clone made read-only for `ro` (recursively with `rbind`), nosuid and
//! nodev, then attached on the entry (`move_mount`), which propagates it into virtiofsd's view.
//! Nothing is ever mounted outside the pod's state directory and no host path is mounted over
//! or unmounted: Delete detaches the container's entries, the pod's end detaches the root.
//! Sources are directories and regular files (single files such as `/etc/hosts` too).
//!
//! **Guest side.** The spec keeps its mount entries in their order (a bind on
//! `/dev/termination-log` must come after the `/dev` tmpfs); only a bind's source becomes its
//! entry's guest path, so the container runtime in the guest binds it at the destination,
//! resolved inside the container's root, with its `ro`. Propagation options: `rslave`/`slave`
//! make the host-side clone a slave (host mounts under the source reach the guest);
//! `rshared`/`shared` (Kubernetes' Bidirectional) cannot send the container's mounts back
//! across a VM, so it is treated as `rslave`, with a log line; the guest gets none of them.
//!
//! **Updates.** kubelet updates configMap, secret, projected and downward API volumes by
//! writing a new timestamped directory and renaming a `..data` symbolic link over the old one;
//! the volume's directory is shared, not its files, so the guest sees the new `..data` once
//! its cached lookup expires (virtiofsd's `auto` cache: one second), as runc's containers do.

pub mod host;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use self::host::{AttachOptions, Source};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("bind mount source {path:?} {why}")]
    Source { path: String, why: String },
    #[error("{0}: {1}")]
    Host(String, #[source] std::io::Error),
    #[error("mounts[{index}] ({destination}): {why}")]
    Spec {
        index: usize,
        destination: String,
        why: String,
    },
    #[error(
        "the pod has host bind mounts (first: {0}) but its VM has no virtio-fs share: no \
         virtiofsd was found when it booted (set `virtiofsd` in the shim config, or build it \
         with `cargo xtask virtiofsd`)"
    )]
    NoShare(String),
}

/// A bind mount of a spec, its source opened on the host.
#[derive(Debug)]
pub struct Bind {
    /// Its index in the spec's `mounts`.
    index: usize,
    source: Source,
    options: AttachOptions,
}

/// Whether a spec mount is a bind (type `bind`, or a `bind`/`rbind` option).
fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind") || options(m).any(is_bind_option)
}

fn is_bind_option(o: &str) -> bool {
    o == "bind" || o == "rbind"
}

fn options(m: &Value) -> impl Iterator<Item = &str> {
    m.get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn is_propagation(o: &str) -> bool {
    matches!(
        o.trim_start_matches('r'),
        "private" | "shared" | "slave" | "unbindable"
    )
}

/// Opens the source of every bind mount of `spec` on the host: before any VM boots, so a
/// refused source costs nothing.
pub fn open_binds(spec: &Value) -> Result<Vec<Bind>, MountError> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut binds = Vec::new();
    for (index, m) in mounts.iter().enumerate().filter(|(_, m)| is_bind(m)) {
        let destination = m
            .get("destination")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let Some(path) = m.get("source").and_then(Value::as_str) else {
            return Err(MountError::Spec {
                index,
                destination,
                why: "a bind mount without a source".into(),
            });
        };
        let mut o = AttachOptions::default();
        for opt in options(m) {
            match opt {
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                "rbind" => o.recursive = true,
                "rslave" | "slave" => o.receive = true,
                "rshared" | "shared" => {
                    tracing::info!(
                        "{destination}: {opt} propagation cannot send the container's mounts \
                         to the host across a VM; host mounts still reach it (rslave)"
                    );
                    o.receive = true;
                }
                _ => {}
            }
        }
        binds.push(Bind {
            index,
            source: host::open_source(path)?,
            options: o,
        });
    }
    Ok(binds)
}

/// The pod's share: its root on the host and the entries each container holds there.
#[derive(Debug)]
pub struct PodShare {
    root: PathBuf,
    next: u64,
    entries: HashMap<String, Vec<PathBuf>>,
}

impl PodShare {
    /// Makes the share root of the pod whose state directory is `state_dir` (see
    /// [`host::make_share_root`]), before the VM boots.
    pub fn create(state_dir: &Path) -> Result<PodShare, MountError> {
        let root = sandbox::share::share_root(state_dir);
        host::make_share_root(&root)?;
        Ok(PodShare {
            root,
            next: 0,
            entries: HashMap::new(),
        })
    }

    /// Attaches `binds` (opened from `spec` by [`open_binds`]) as entries of `container` and
    /// points their spec sources at the entries' guest paths. All or nothing: on an error, the
    /// entries made so far are removed again.
    pub fn attach(
        &mut self,
        container: &str,
        spec: &mut Value,
        binds: Vec<Bind>,
    ) -> Result<(), MountError> {
        let mut made = Vec::new();
        let r = self.attach_all(spec, binds, &mut made);
        match r {
            Ok(()) => {
                if !made.is_empty() {
                    self.entries
                        .entry(container.to_string())
                        .or_default()
                        .extend(made);
                }
                Ok(())
            }
            Err(e) => {
                remove_entries(&made);
                Err(e)
            }
        }
    }

    fn attach_all(
        &mut self,
        spec: &mut Value,
        binds: Vec<Bind>,
        made: &mut Vec<PathBuf>,
    ) -> Result<(), MountError> {
        for b in binds {
            let name = self.next.to_string();
            self.next += 1;
            let entry = self.root.join(&name);
            host::attach(&b.source, &entry, b.options)?;
            made.push(entry);
            let m = &mut spec["mounts"][b.index];
            m["source"] = Value::from(format!("{}/{name}", sandbox::share::GUEST_SHARE_DIR));
            let kept: Vec<Value> = options(m)
                .filter(|o| !is_propagation(o))
                .map(Value::from)
                .collect();
            m["options"] = Value::from(kept);
            tracing::debug!(
                source = %b.source.path,
                entry = %name,
                "bind source shared into the pod's VM"
            );
        }
        Ok(())
    }

    /// Removes the entries of `container` (its Delete, or a failed Create).
    pub fn detach(&mut self, container: &str) {
        if let Some(entries) = self.entries.remove(container) {
            remove_entries(&entries);
        }
    }
}

fn remove_entries(entries: &[PathBuf]) {
    for e in entries {
        if let Err(err) = host::remove_entry(e) {
            tracing::warn!("remove the share entry {}: {err}", e.display());
        }
    }
}

/// For a pod without a share: its spec must have no bind mounts.
pub fn refuse_without_share(binds: &[Bind]) -> Result<(), MountError> {
    match binds.first() {
        Some(b) => Err(MountError::NoShare(b.source.path.clone())),
        None => Ok(()),
    }
}

/// Removes a pod's state directory, its share detached first. If anything is still mounted
/// beneath it, the directory is left as it is (with a log line): removing files beneath a
/// mount would remove a volume's host files.
pub fn remove_state_dir(dir: &Path) {
    let root = sandbox::share::share_root(dir);
    if let Err(e) = host::detach_tree(&root) {
        tracing::warn!("detach the pod's share {}: {e}", root.display());
    }
    if host::mounted(dir, true) {
        tracing::warn!(
            "{} still has mounts beneath it: left in place",
            dir.display()
        );
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests;
