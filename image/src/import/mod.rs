//! Images from disk: an OCI image layout directory, an OCI archive (a layout in a tar), or a
//! docker-archive (`docker save`: `manifest.json` + config + layer tars; newer docker also
//! writes an OCI layout into the same tar, which is then preferred).

use crate::blob::{self, BlobWriter};
use crate::index::{self, ImageRecord};
use crate::manifest::{self, Descriptor, Kind};
use crate::{
    io_err, progress_bar, short_digest, Error, Fetched, Image, ImageStore, PullOptions, Result,
};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

mod docker;
mod source;

use source::{Archive, BlobSource, LayoutDir, MAX_METADATA_BYTES};

pub(crate) fn import_layout_dir(
    store: &ImageStore,
    dir: &Path,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let source = LayoutDir { dir };
    let index = source
        .read_small("index.json", MAX_METADATA_BYTES)?
        .ok_or_else(|| Error::InvalidImage {
            origin: source.origin(),
            reason: "a directory given as an image must be an OCI image layout (no index.json)"
                .into(),
        })?;
    import_oci(store, &source, &index, &derived_name(dir), Vec::new(), opts)
}

pub(crate) fn import_archive(
    store: &ImageStore,
    path: &Path,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let mut file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut magic = [0u8; 2];
    let n = file
        .read(&mut magic)
        .map_err(io_err(format!("reading {}", path.display())))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_err(format!("reading {}", path.display())))?;
    // `docker save | gzip` is common: decompress into the store's temp dir, then read it as
    // any archive (blobs are read by seeking, which a gzip stream cannot do).
    let _decompressed;
    if n == 2 && magic == [0x1f, 0x8b] {
        let mut tmp = tempfile::Builder::new()
            .prefix("archive-")
            .tempfile_in(store.tmp_dir())
            .map_err(io_err("creating a temporary file"))?;
        std::io::copy(&mut flate2::read::GzDecoder::new(file), &mut tmp).map_err(|e| {
            Error::InvalidImage {
                origin: path.display().to_string(),
                reason: format!("bad gzip stream: {e}"),
            }
        })?;
        file = tmp.reopen().map_err(io_err("reopening a temporary file"))?;
        _decompressed = tmp;
    }
    let archive = Archive::open(path, file)?;
    let name = derived_name(path);
    // Docker's RepoTags, when there is a manifest.json (both docker formats have one).
    let mut repo_tags = Vec::new();
    let docker_manifest = archive.read_small("manifest.json", MAX_METADATA_BYTES)?;
    let docker_entry = match &docker_manifest {
        Some(bytes) => {
            let entries: Vec<DockerArchiveEntry> =
                serde_json::from_slice(bytes).map_err(|e| Error::InvalidImage {
                    origin: archive.origin(),
                    reason: format!("manifest.json is not a docker-archive manifest: {e}"),
                })?;
            let first = entries
                .into_iter()
                .next()
                .ok_or_else(|| Error::InvalidImage {
                    origin: archive.origin(),
                    reason: "manifest.json lists no image".into(),
                })?;
            repo_tags = first
                .repo_tags
                .iter()
                .map(|t| index::normalize_name(t).unwrap_or_else(|| t.clone()))
                .collect();
            Some(first)
        }
        None => None,
    };
    if let Some(index) = archive.read_small("index.json", MAX_METADATA_BYTES)? {
        return import_oci(store, &archive, &index, &name, repo_tags, opts);
    }
    match docker_entry {
        Some(entry) => docker::import_docker(store, &archive, entry, &name, repo_tags, opts),
        None => Err(Error::InvalidImage {
            origin: archive.origin(),
            reason: "neither an OCI archive (index.json) nor a docker-archive (manifest.json)"
                .into(),
        }),
    }
}

#[derive(serde::Deserialize)]
struct DockerArchiveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// `name:latest` from a path's last component, lowercased and restricted to the characters a
/// repository name may have.
fn derived_name(path: &Path) -> String {
    let base = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().to_string()))
        .unwrap_or_else(|| "image".to_string());
    let stem = [".tar.gz", ".tgz", ".tar"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(&base);
    let mut name: String = stem
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if name.is_empty() {
        name = "image".into();
    }
    format!("{name}:latest")
}

fn blob_path(digest: &str) -> Result<String> {
    Ok(format!("blobs/sha256/{}", blob::digest_hex(digest)?))
}

/// A manifest or index of the source, read into memory: refused past `MAX_MANIFEST_BYTES`.
fn read_manifest(source: &dyn BlobSource, desc: &Descriptor) -> Result<Vec<u8>> {
    blob::check_manifest_size(desc)?;
    let bytes = source
        .read_small(&blob_path(&desc.digest)?, blob::MAX_MANIFEST_BYTES)?
        .ok_or_else(|| Error::InvalidImage {
            origin: source.origin(),
            reason: format!("blob {} is missing", desc.digest),
        })?;
    let actual = blob::sha256_digest(&bytes);
    if actual != desc.digest || bytes.len() as u64 != desc.size {
        return Err(Error::CorruptBlob {
            digest: desc.digest.clone(),
            origin: source.origin(),
            reason: format!("{} bytes hashing to {actual}", bytes.len()),
        });
    }
    Ok(bytes)
}

/// Copies one blob from the source into the store unless the store has it; returns whether
/// it was copied.
fn import_blob(
    store: &ImageStore,
    source: &dyn BlobSource,
    member: &str,
    digest: &str,
    size: Option<u64>,
    opts: &PullOptions,
) -> Result<bool> {
    if blob::has_blob(store, digest)? {
        return Ok(false);
    }
    let (reader, actual_size) = source.open(member)?.ok_or_else(|| Error::InvalidImage {
        origin: source.origin(),
        reason: format!("{member} (blob {digest}) is missing"),
    })?;
    let bar = progress_bar(
        opts.progress,
        actual_size,
        format!("import {}", short_digest(digest)),
    );
    let mut reader = bar.wrap_read(reader);
    let mut writer = BlobWriter::new(store, &format!("{} ({member})", source.origin()))?;
    writer.copy_from(&mut reader, size)?;
    bar.finish_and_clear();
    writer.commit(digest, size)?;
    Ok(true)
}

fn import_oci(
    store: &ImageStore,
    source: &dyn BlobSource,
    index_bytes: &[u8],
    fallback_name: &str,
    mut names: Vec<String>,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let origin = source.origin();
    let entries = match manifest::parse(index_bytes, &format!("{origin}: index.json"))? {
        Kind::Index(entries) => entries,
        Kind::Manifest { .. } => {
            return Err(Error::InvalidImage {
                origin,
                reason: "index.json is a manifest, not an index".into(),
            })
        }
    };
    let top = if entries.len() == 1 {
        &entries[0]
    } else {
        manifest::choose_platform(&entries, &format!("{origin}: index.json"))?
    };
    for key in [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ] {
        if let Some(value) = top.annotations.get(key) {
            let name = if value.contains('/') || value.contains(':') || value.contains('@') {
                index::normalize_name(value).unwrap_or_else(|| value.clone())
            } else {
                // A bare tag: the layout has no repository name of its own.
                let repo = fallback_name.trim_end_matches(":latest");
                format!("{repo}:{value}")
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if names.is_empty() {
        names.push(fallback_name.to_string());
    }

    let mut fetched = Fetched::default();
    let mut desc = top.clone();
    let mut depth = 0;
    let (manifest_bytes, config, layers) = loop {
        let bytes = read_manifest(source, &desc)?;
        match manifest::parse(&bytes, &format!("{origin}: {}", desc.digest))? {
            Kind::Manifest { config, layers } => break (bytes, config, layers),
            Kind::Index(entries) => {
                depth += 1;
                if depth > 4 {
                    return Err(Error::InvalidImage {
                        origin,
                        reason: "indexes nested too deeply".into(),
                    });
                }
                desc = manifest::choose_platform(&entries, &format!("{origin}: {}", desc.digest))?
                    .clone();
            }
        }
    };
    blob::check_config_size(&config)?;
    let id = desc.digest.clone();
    if blob::put_bytes(store, &id, &manifest_bytes, &origin)? {
        fetched.blobs_imported += 1;
    }
    for d in std::iter::once(&config).chain(layers.iter()) {
        if import_blob(
            store,
            source,
            &blob_path(&d.digest)?,
            &d.digest,
            Some(d.size),
            opts,
        )? {
            fetched.blobs_imported += 1;
        }
    }
    finish(store, id, names, config, layers, fetched)
}

/// Records the image (whose blobs are all in the store now) and returns it.
pub(crate) fn finish(
    store: &ImageStore,
    id: String,
    names: Vec<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    fetched: Fetched,
) -> Result<(Image, Fetched)> {
    let strip = |d: Descriptor| Descriptor {
        platform: None,
        annotations: Default::default(),
        ..d
    };
    let record = ImageRecord {
        id,
        names,
        config: strip(config),
        layers: layers.into_iter().map(strip).collect(),
    };
    // An image whose config does not parse is not recorded: `list` would fail on it.
    let mut image = store.image_of(&record)?;
    let record = index::add_image(store, record)?;
    tracing::debug!(id = %record.id, names = ?record.names, ?fetched, "image stored");
    image.names = record.names;
    Ok((image, fetched))
}
