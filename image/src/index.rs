//! `<root>/images.json`: the images in the store and their names. Replaced atomically
//! (temporary file + rename) under `<root>/index.lock`.

use crate::manifest::Descriptor;
use crate::{io_err, Error, ImageStore, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    /// The manifest digest.
    pub id: String,
    pub names: Vec<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Index {
    pub images: Vec<ImageRecord>,
}

/// The full form of a registry-style name (`busybox` → `docker.io/library/busybox:latest`),
/// or None when it does not parse as one.
pub(crate) fn normalize_name(name: &str) -> Option<String> {
    name.parse::<oci_client::Reference>()
        .ok()
        .map(|r| r.whole())
}

impl Index {
    fn path(store: &ImageStore) -> std::path::PathBuf {
        store.root().join("images.json")
    }

    pub(crate) fn load(store: &ImageStore) -> Result<Self> {
        let path = Self::path(store);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::InvalidImage {
                origin: path.display().to_string(),
                reason: format!("the store's index is unreadable: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    pub(crate) fn save(&self, store: &ImageStore) -> Result<()> {
        let path = Self::path(store);
        let mut tmp = tempfile::Builder::new()
            .prefix("images.json.")
            .tempfile_in(store.tmp_dir())
            .map_err(io_err("creating a temporary index file"))?;
        let bytes = serde_json::to_vec_pretty(self).expect("the index serializes");
        tmp.write_all(&bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io_err(format!("writing {}", tmp.path().display())))?;
        tmp.persist(&path)
            .map_err(|e| io_err(format!("replacing {}", path.display()))(e.error))?;
        Ok(())
    }

    /// By exact name, by name with `:latest` added, by normalized registry name, by id, or
    /// by unambiguous id prefix (with or without `sha256:`, at least 4 hex digits).
    pub(crate) fn find(&self, key: &str) -> Result<Option<&ImageRecord>> {
        Ok(self.find_match(key)?.map(|(record, _)| record))
    }

    /// As [`Index::find`], also saying which name matched (None when the key was an id).
    pub(crate) fn find_match(&self, key: &str) -> Result<Option<(&ImageRecord, Option<String>)>> {
        let by_name = |name: &str| {
            self.images
                .iter()
                .find(|r| r.names.iter().any(|n| n == name))
                .map(|r| (r, Some(name.to_string())))
        };
        if let Some(found) = by_name(key) {
            return Ok(Some(found));
        }
        if !key.contains(':') && !key.contains('@') {
            if let Some(found) = by_name(&format!("{key}:latest")) {
                return Ok(Some(found));
            }
        }
        if let Some(found) = normalize_name(key).as_deref().and_then(by_name) {
            return Ok(Some(found));
        }
        let hex = key.strip_prefix("sha256:").unwrap_or(key);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let matches: Vec<&ImageRecord> = self
                .images
                .iter()
                .filter(|r| {
                    r.id.strip_prefix("sha256:")
                        .is_some_and(|h| h.starts_with(&hex))
                })
                .collect();
            return match matches.len() {
                0 => Ok(None),
                1 => Ok(Some((matches[0], None))),
                _ => Err(Error::Ambiguous(key.to_string())),
            };
        }
        Ok(None)
    }

    pub(crate) fn by_id(&self, id: &str) -> Option<&ImageRecord> {
        self.images.iter().find(|r| r.id == id)
    }
}

/// Records `record` (merging names with an existing record of the same id) and moves each of
/// its names off any other image, as a tag moves in docker. An image left without names
/// stays in the store (reachable by id) until removed.
pub(crate) fn add_image(store: &ImageStore, record: ImageRecord) -> Result<ImageRecord> {
    let _lock = store.index_lock()?;
    let mut index = Index::load(store)?;
    for other in index.images.iter_mut().filter(|r| r.id != record.id) {
        other.names.retain(|n| !record.names.contains(n));
    }
    let merged = match index.images.iter_mut().find(|r| r.id == record.id) {
        Some(existing) => {
            for name in &record.names {
                if !existing.names.contains(name) {
                    existing.names.push(name.clone());
                }
            }
            existing.clone()
        }
        None => {
            index.images.push(record.clone());
            record
        }
    };
    index.save(store)?;
    Ok(merged)
}
