//! docker-archive (`docker save` before docker 25): `manifest.json`, the config, and layer
//! tars, stored as an OCI image with a manifest written for it.

use super::source::{Archive, BlobSource};
use super::{finish, import_blob, DockerArchiveEntry};
use crate::blob::{self, BlobWriter};
use crate::manifest::{self, Descriptor};
use crate::{
    io_err, progress_bar, short_digest, Error, Fetched, Image, ImageStore, PullOptions, Result,
};
use std::io::Read;

pub(super) fn import_docker(
    store: &ImageStore,
    archive: &Archive,
    entry: DockerArchiveEntry,
    fallback_name: &str,
    mut names: Vec<String>,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let origin = archive.origin();
    let config_bytes = archive
        .read_small(&entry.config, blob::MAX_CONFIG_BYTES)?
        .ok_or_else(|| Error::InvalidImage {
            origin: origin.clone(),
            reason: format!("the config {} is missing", entry.config),
        })?;
    let config_digest = blob::sha256_digest(&config_bytes);
    #[derive(serde::Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct ConfigRootFs {
        rootfs: RootFs,
    }
    let parsed: ConfigRootFs =
        serde_json::from_slice(&config_bytes).map_err(|e| Error::InvalidImage {
            origin: format!("{origin}: {}", entry.config),
            reason: format!("not an image config: {e}"),
        })?;
    if parsed.rootfs.diff_ids.len() != entry.layers.len() {
        return Err(Error::InvalidImage {
            origin,
            reason: format!(
                "the config lists {} layers, manifest.json {}",
                parsed.rootfs.diff_ids.len(),
                entry.layers.len()
            ),
        });
    }
    let mut fetched = Fetched::default();
    if blob::put_bytes(store, &config_digest, &config_bytes, &origin)? {
        fetched.blobs_imported += 1;
    }
    let mut layers = Vec::new();
    // docker save writes uncompressed layer tars, so each file's digest is its diff id.
    for (member, diff_id) in entry.layers.iter().zip(&parsed.rootfs.diff_ids) {
        blob::digest_hex(diff_id)?;
        let Some((mut reader, size)) = archive.open(member)? else {
            return Err(Error::InvalidImage {
                origin,
                reason: format!("layer {member} is missing"),
            });
        };
        let mut magic = [0u8; 4];
        let magic_len = reader
            .read(&mut magic)
            .map_err(io_err(format!("reading {member} in {origin}")))?;
        drop(reader);
        let compression = match &magic[..magic_len] {
            [0x1f, 0x8b, ..] => Some("gzip"),
            [0x28, 0xb5, 0x2f, 0xfd] => Some("zstd"),
            _ => None,
        };
        let (digest, media_type) = match compression {
            // docker save writes plain layer tars: the file's digest is its diff id.
            None => {
                if import_blob(store, archive, member, diff_id, Some(size), opts)? {
                    fetched.blobs_imported += 1;
                }
                (diff_id.clone(), manifest::OCI_LAYER_TAR.to_string())
            }
            // Other tools may compress them: keep the blob as it is, and check that it
            // decompresses to the diff id.
            Some(kind) => {
                let (digest, new) = import_compressed_layer(store, archive, member, diff_id, opts)?;
                if new {
                    fetched.blobs_imported += 1;
                }
                (digest, format!("{}+{kind}", manifest::OCI_LAYER_TAR))
            }
        };
        layers.push(Descriptor {
            media_type,
            digest,
            size,
            platform: None,
            annotations: Default::default(),
        });
    }
    let config = Descriptor {
        media_type: manifest::OCI_CONFIG.into(),
        digest: config_digest,
        size: config_bytes.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    let manifest_bytes = manifest::oci_manifest_bytes(&config, &layers);
    let id = blob::sha256_digest(&manifest_bytes);
    if blob::put_bytes(store, &id, &manifest_bytes, &origin)? {
        fetched.blobs_imported += 1;
    }
    if names.is_empty() {
        names.push(fallback_name.to_string());
    }
    finish(store, id, names, config, layers, fetched)
}

/// A compressed layer of a docker-archive: stored under the digest of its bytes once its
/// content is shown to decompress to `diff_id`. Returns the digest and whether it is new.
fn import_compressed_layer(
    store: &ImageStore,
    archive: &Archive,
    member: &str,
    diff_id: &str,
    opts: &PullOptions,
) -> Result<(String, bool)> {
    let origin = format!("{} ({member})", archive.origin());
    let (reader, size) = archive.open(member)?.ok_or_else(|| Error::InvalidImage {
        origin: origin.clone(),
        reason: "missing".into(),
    })?;
    let bar = progress_bar(
        opts.progress,
        size,
        format!("import {}", short_digest(diff_id)),
    );
    let mut writer = BlobWriter::new(store, &origin)?;
    writer.copy_from(&mut bar.wrap_read(reader), Some(size))?;
    bar.finish_and_clear();
    let digest = writer.digest();
    let new = !blob::has_blob(store, &digest)?;
    if new {
        writer.commit(&digest, Some(size))?;
    }
    let mut content = crate::unpack::decompressor(blob::open_blob(store, &digest)?, &digest)?;
    let mut hasher = BlobHasher::default();
    std::io::copy(&mut content, &mut hasher).map_err(|e| Error::CorruptBlob {
        digest: diff_id.to_string(),
        origin: origin.clone(),
        reason: format!("does not decompress: {e}"),
    })?;
    let actual = hasher.digest();
    if actual != diff_id {
        if new {
            let _ = std::fs::remove_file(store.blob_path(blob::digest_hex(&digest)?));
        }
        return Err(Error::CorruptBlob {
            digest: diff_id.to_string(),
            origin,
            reason: format!("the layer decompresses to {actual}"),
        });
    }
    Ok((digest, new))
}

/// sha256 of what is written to it.
#[derive(Default)]
struct BlobHasher(sha2::Sha256);

impl BlobHasher {
    fn digest(self) -> String {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

impl std::io::Write for BlobHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
