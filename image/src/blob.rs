//! Content-addressed blobs: written to a temporary file, verified by digest and size, then
//! renamed into `<root>/blobs/sha256/<hex>`.

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

pub(crate) fn read_blob(store: &ImageStore, digest: &str) -> Result<Vec<u8>> {
    let path = store.blob_path(digest_hex(digest)?);
    std::fs::read(&path).map_err(io_err(format!(
        "reading blob {digest} ({})",
        path.display()
    )))
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
