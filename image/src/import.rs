//! Images from disk: an OCI image layout directory, an OCI archive (a layout in a tar), or a
//! docker-archive (`docker save`: `manifest.json` + config + layer tars; newer docker also
//! writes an OCI layout into the same tar, which is then preferred).

use crate::blob::{self, BlobWriter};
use crate::index::{self, ImageRecord};
use crate::manifest::{self, Descriptor, Kind};
use crate::{
    io_err, progress_bar, short_digest, Error, Fetched, Image, ImageStore, PullOptions, Result,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Metadata files (index.json, manifests, configs) are read into memory; refuse absurd ones.
const MAX_METADATA_BYTES: u64 = 16 << 20;

/// Where the blobs of one source are.
trait BlobSource {
    fn origin(&self) -> String;
    /// A reader over the file at `path` (relative to the layout/archive root) and its size.
    fn open(&self, path: &str) -> Result<Option<(Box<dyn Read + '_>, u64)>>;

    fn read_small(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some((mut reader, size)) = self.open(path)? else {
            return Ok(None);
        };
        if size > MAX_METADATA_BYTES {
            return Err(Error::InvalidImage {
                origin: self.origin(),
                reason: format!("{path} is {size} bytes, too large for metadata"),
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader
            .read_to_end(&mut bytes)
            .map_err(io_err(format!("reading {path} in {}", self.origin())))?;
        Ok(Some(bytes))
    }
}

struct LayoutDir<'a> {
    dir: &'a Path,
}

impl BlobSource for LayoutDir<'_> {
    fn origin(&self) -> String {
        format!("OCI layout {}", self.dir.display())
    }

    fn open(&self, path: &str) -> Result<Option<(Box<dyn Read + '_>, u64)>> {
        let full = self.dir.join(path);
        match File::open(&full) {
            Ok(file) => {
                let size = file
                    .metadata()
                    .map_err(io_err(format!("reading {}", full.display())))?
                    .len();
                Ok(Some((Box::new(file), size)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("opening {}", full.display()))(e)),
        }
    }
}

/// A tar archive read in place: one pass records where each file's bytes are, then blobs are
/// read by seeking.
struct Archive {
    path: String,
    file: File,
    /// Normalized member path → (offset of its data, size).
    files: HashMap<String, (u64, u64)>,
    /// Normalized member path → normalized target (docker's legacy format links repeated
    /// layers).
    links: HashMap<String, String>,
}

fn normalize_member(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

impl Archive {
    fn open(path: &Path, file: File) -> Result<Self> {
        let origin = path.display().to_string();
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let mut archive = tar::Archive::new(
            file.try_clone()
                .map_err(io_err(format!("opening {origin}")))?,
        );
        let bad = |e: std::io::Error| Error::InvalidImage {
            origin: origin.clone(),
            reason: format!("not a readable tar archive: {e}"),
        };
        for entry in archive.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let name = normalize_member(&String::from_utf8_lossy(&entry.path_bytes()));
            let kind = entry.header().entry_type();
            if kind.is_file() || kind == tar::EntryType::Continuous {
                files.insert(name, (entry.raw_file_position(), entry.size()));
            } else if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = entry.link_name_bytes() {
                    let target = String::from_utf8_lossy(&target).to_string();
                    let resolved = if kind.is_symlink() && !target.starts_with('/') {
                        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                        normalize_member(&format!("{dir}/{target}"))
                    } else {
                        normalize_member(&target)
                    };
                    links.insert(name, resolved);
                }
            }
        }
        Ok(Self {
            path: origin,
            file,
            files,
            links,
        })
    }
}

impl BlobSource for Archive {
    fn origin(&self) -> String {
        format!("archive {}", self.path)
    }

    fn open(&self, path: &str) -> Result<Option<(Box<dyn Read + '_>, u64)>> {
        let mut name = normalize_member(path);
        for _ in 0..8 {
            if let Some(&(offset, size)) = self.files.get(&name) {
                let mut file = &self.file;
                file.seek(SeekFrom::Start(offset))
                    .map_err(io_err(format!("seeking in {}", self.path)))?;
                return Ok(Some((Box::new(file.take(size)), size)));
            }
            match self.links.get(&name) {
                Some(target) => name = target.clone(),
                None => return Ok(None),
            }
        }
        Ok(None)
    }
}

pub(crate) fn import_layout_dir(
    store: &ImageStore,
    dir: &Path,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let source = LayoutDir { dir };
    let index = source
        .read_small("index.json")?
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
    let docker_manifest = archive.read_small("manifest.json")?;
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
    if let Some(index) = archive.read_small("index.json")? {
        return import_oci(store, &archive, &index, &name, repo_tags, opts);
    }
    match docker_entry {
        Some(entry) => import_docker(store, &archive, entry, &name, repo_tags, opts),
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

fn read_verified(source: &dyn BlobSource, desc: &Descriptor) -> Result<Vec<u8>> {
    let bytes = source
        .read_small(&blob_path(&desc.digest)?)?
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
        let bytes = read_verified(source, &desc)?;
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

fn import_docker(
    store: &ImageStore,
    archive: &Archive,
    entry: DockerArchiveEntry,
    fallback_name: &str,
    mut names: Vec<String>,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let origin = archive.origin();
    let config_bytes = archive
        .read_small(&entry.config)?
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
