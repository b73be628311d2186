//! Where an import reads from: an OCI layout directory, or a tar archive read in place.

use crate::{io_err, Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// `index.json` and docker's `manifest.json` are read into memory; refuse absurd ones.
pub(super) const MAX_METADATA_BYTES: u64 = 16 << 20;

/// Where the blobs of one source are.
pub(super) trait BlobSource {
    fn origin(&self) -> String;
    /// A reader over the file at `path` (relative to the layout/archive root) and its size.
    fn open(&self, path: &str) -> Result<Option<(Box<dyn Read + '_>, u64)>>;

    /// The whole file at `path`, refused past `limit` bytes (it is held in memory).
    fn read_small(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some((reader, size)) = self.open(path)? else {
            return Ok(None);
        };
        let too_large = |size: u64| Error::InvalidImage {
            origin: self.origin(),
            reason: format!("{path} is {size} bytes, more than the {limit} bytes allowed"),
        };
        if size > limit {
            return Err(too_large(size));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(format!("reading {path} in {}", self.origin())))?;
        if bytes.len() as u64 > limit {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(Some(bytes))
    }
}

pub(super) struct LayoutDir<'a> {
    pub(super) dir: &'a Path,
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
pub(super) struct Archive {
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
    pub(super) fn open(path: &Path, file: File) -> Result<Self> {
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
