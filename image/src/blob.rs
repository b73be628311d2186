//! Content-addressed blobs: written to a temporary file, verified by digest and size, then
//! renamed into `<root>/blobs/sha256/<hex>`.

use crate::manifest::Descriptor;
use crate::{io_err, Error, ImageStore, Result};
use sha2::{Digest as _, Sha256};
use std::io::{Read, Write};

/// The hex part of a `sha256:<64 hex>` digest. Anything else is refused: digests come from
/// manifests we do not trust and become file names.
pub(crate) fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::InvalidImage {
            origin: digest.to_string(),
            reason: "only sha256 digests are supported".into(),
        })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::InvalidImage {
            origin: digest.to_string(),
            reason: "not a sha256 digest (64 lowercase hex digits)".into(),
        });
    }
    Ok(hex)
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn has_blob(store: &ImageStore, digest: &str) -> Result<bool> {
    Ok(store.blob_path(digest_hex(digest)?).is_file())
}

/// Manifests and indexes are held in memory whole: at most this (the limit of the
/// distribution registry itself).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Image configs are held in memory whole and parsed: at most this.
pub(crate) const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Refuses a `what` (manifest, config) of `size` bytes above `limit`, naming its digest.
pub(crate) fn check_size(what: &'static str, digest: &str, size: u64, limit: u64) -> Result<()> {
    if size > limit {
        return Err(Error::TooLarge {
            what,
            digest: digest.to_string(),
            size,
            limit,
        });
    }
    Ok(())
}

/// Refuses a config descriptor past [`MAX_CONFIG_BYTES`].
pub(crate) fn check_config_size(config: &Descriptor) -> Result<()> {
    check_size("config", &config.digest, config.size, MAX_CONFIG_BYTES)
}

/// Refuses a manifest (or index) descriptor past [`MAX_MANIFEST_BYTES`].
pub(crate) fn check_manifest_size(manifest: &Descriptor) -> Result<()> {
    check_size(
        "manifest",
        &manifest.digest,
        manifest.size,
        MAX_MANIFEST_BYTES,
    )
}

/// A stored blob read into memory, refused past `limit` bytes (checked before reading, and
/// while reading: the file is not trusted to keep its size).
pub(crate) fn read_blob(
    store: &ImageStore,
    digest: &str,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>> {
    let path = store.blob_path(digest_hex(digest)?);
    let context = || format!("reading blob {digest} ({})", path.display());
    let file = std::fs::File::open(&path).map_err(io_err(context()))?;
    let size = file.metadata().map_err(io_err(context()))?.len();
    check_size(what, digest, size, limit)?;
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(context()))?;
    check_size(what, digest, bytes.len() as u64, limit)?;
    Ok(bytes)
}

pub(crate) fn open_blob(store: &ImageStore, digest: &str) -> Result<std::fs::File> {
    let path = store.blob_path(digest_hex(digest)?);
    std::fs::File::open(&path).map_err(io_err(format!(
        "opening blob {digest} ({})",
        path.display()
    )))
}

/// A blob on its way into the store.
pub(crate) struct BlobWriter {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    origin: String,
}

impl BlobWriter {
    /// `origin` says where the bytes come from, for error messages ("registry X", "archive Y").
    pub(crate) fn new(store: &ImageStore, origin: &str) -> Result<Self> {
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(store.tmp_dir())
            .map_err(io_err(format!(
                "creating a temporary file in {}",
                store.tmp_dir().display()
            )))?;
        Ok(Self {
            file,
            hasher: Sha256::new(),
            written: 0,
            origin: origin.to_string(),
        })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(io_err(format!("writing {}", self.file.path().display())))
    }

    /// Copies all of `reader`, stopping with an error past `limit` bytes (a descriptor's size:
    /// a longer stream is corrupt, and reading on would only fill the disk).
    pub(crate) fn copy_from(&mut self, reader: &mut impl Read, limit: Option<u64>) -> Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(io_err(format!("reading from {}", self.origin)))?;
            if n == 0 {
                return Ok(());
            }
            self.write(&buf[..n])?;
            if let Some(limit) = limit {
                if self.written > limit {
                    return Ok(()); // commit reports the size mismatch
                }
            }
        }
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written so far.
    pub(crate) fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Verifies the content against `digest` (and `size` when known) and moves it into the
    /// store. A mismatch discards the temporary file and names the digest.
    pub(crate) fn commit(mut self, digest: &str, size: Option<u64>) -> Result<()> {
        let hex = digest_hex(digest)?.to_string();
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize_reset()));
        if let Some(size) = size {
            if size != self.written {
                return Err(Error::CorruptBlob {
                    digest: digest.to_string(),
                    origin: self.origin,
                    reason: format!("expected {size} bytes, got {}", self.written),
                });
            }
        }
        if actual != digest {
            return Err(Error::CorruptBlob {
                digest: digest.to_string(),
                origin: self.origin,
                reason: format!("content hashes to {actual}"),
            });
        }
        self.file
            .as_file()
            .sync_all()
            .map_err(io_err(format!("syncing {}", self.file.path().display())))?;
        let dest = store_blob_path(&self.file, &hex);
        self.file
            .persist(&dest)
            .map_err(|e| io_err(format!("moving blob {digest} to {}", dest.display()))(e.error))?;
        Ok(())
    }
}

fn store_blob_path(tmp: &tempfile::NamedTempFile, hex: &str) -> std::path::PathBuf {
    // The temporary file lives in <root>/tmp; blobs in <root>/blobs/sha256.
    let root = tmp
        .path()
        .parent()
        .and_then(|p| p.parent())
        .expect("temporary blob files live in <root>/tmp");
    root.join("blobs/sha256").join(hex)
}

/// Stores `bytes` (already in memory: manifests, configs) under `digest`, verifying it.
/// Returns whether the blob was new.
pub(crate) fn put_bytes(
    store: &ImageStore,
    digest: &str,
    bytes: &[u8],
    origin: &str,
) -> Result<bool> {
    if has_blob(store, digest)? {
        return Ok(false);
    }
    let mut writer = BlobWriter::new(store, origin)?;
    writer.write(bytes)?;
    writer.commit(digest, Some(bytes.len() as u64))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_blobs_are_not_read_into_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path().join("store")).unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let path = store.blob_path(digest_hex(&digest).unwrap());
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_CONFIG_BYTES + 1)
            .unwrap();
        match read_blob(&store, &digest, "config", MAX_CONFIG_BYTES) {
            Err(Error::TooLarge {
                what: "config",
                digest: d,
                size,
                limit,
            }) => assert_eq!(
                (d, size, limit),
                (digest.clone(), MAX_CONFIG_BYTES + 1, MAX_CONFIG_BYTES)
            ),
            other => panic!("{other:?}"),
        }
        std::fs::File::create(&path).unwrap().set_len(100).unwrap();
        assert_eq!(
            read_blob(&store, &digest, "config", MAX_CONFIG_BYTES)
                .unwrap()
                .len(),
            100
        );
    }
}
