//! The local OCI image store behind `microvm run`, `pull`, `images` and `rmi`.
//!
//! SKELETON: this file fixes the public API that the CLI (`cli/`) and the containerd shim
//! (`shim/`) code against; the implementation lands with issue #4. Every function that is not
//! implemented yet returns [`Error::NotImplemented`].

use std::path::{Path, PathBuf};

pub use oci_spec::image::ImageConfiguration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not implemented yet: {0}")]
    NotImplemented(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP (and no TLS verification) for this registry.
    pub insecure: bool,
    /// Basic/bearer credentials; anonymous when `None`.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Progress bars on stderr (the CLI sets this when stderr is a terminal).
    pub progress: bool,
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct Image {
    /// The digest of its (linux/amd64) manifest, "sha256:...": what the store is keyed by.
    pub id: String,
    /// The names it was pulled or imported under ("localhost:5000/busybox:latest").
    pub names: Vec<String>,
    /// Its image config (Entrypoint, Cmd, Env, WorkingDir, User, ...).
    pub config: ImageConfiguration,
    /// Sum of its compressed layer sizes, bytes.
    pub size: u64,
}

/// What [`ImageStore::ensure`] had to do: both zero when the image was already stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    pub blobs_downloaded: usize,
    pub blobs_imported: usize,
}

/// The read-only root filesystem disk of an image (attach it to the VM read-only).
#[derive(Debug, Clone)]
pub struct RootfsDisk {
    pub path: PathBuf,
    /// The guest mounts it with this filesystem type ("ext4" or "erofs").
    pub fstype: String,
    /// False when it came from the cache.
    pub built: bool,
}

/// A user as the image's /etc/passwd and /etc/group resolve it (docker's `-u` semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// The content-addressed store under one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Where the store lives unless told otherwise: `$MICROVM_HOME/images`, else
    /// `/var/lib/microvm/images` for root, else `~/.local/share/microvm/images`.
    pub fn default_root() -> PathBuf {
        if let Some(h) = std::env::var_os("MICROVM_HOME") {
            return PathBuf::from(h).join("images");
        }
        PathBuf::from("/var/lib/microvm/images")
    }

    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self { root: root.into() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `IMAGE` as `microvm run` takes it: an existing directory is an OCI image layout, an
    /// existing file an OCI or docker-archive tarball, anything else a registry reference.
    /// Fetches only what the store lacks.
    pub async fn ensure(&self, _image: &str, _opts: &PullOptions) -> Result<(Image, Fetched)> {
        Err(Error::NotImplemented("ImageStore::ensure"))
    }

    /// Looks an image up by name, id or unambiguous id prefix.
    pub fn get(&self, _name_or_id: &str) -> Result<Option<Image>> {
        Err(Error::NotImplemented("ImageStore::get"))
    }

    pub fn list(&self) -> Result<Vec<Image>> {
        Err(Error::NotImplemented("ImageStore::list"))
    }

    /// Removes a name; the image's blobs and disk go with its last name.
    pub fn remove(&self, _name_or_id: &str) -> Result<()> {
        Err(Error::NotImplemented("ImageStore::remove"))
    }

    /// The image's root filesystem disk, built from its layers on first use and cached by
    /// image id.
    pub fn rootfs_disk(&self, _image: &Image) -> Result<RootfsDisk> {
        Err(Error::NotImplemented("ImageStore::rootfs_disk"))
    }

    /// Resolves `user`, `uid`, `user:group` or `uid:gid` against the image's /etc/passwd and
    /// /etc/group.
    pub fn resolve_user(&self, _image: &Image, _user: &str) -> Result<User> {
        Err(Error::NotImplemented("ImageStore::resolve_user"))
    }
}

/// Building a filesystem image from a directory tree (also used by the containerd shim for
/// snapshotter rootfs trees).
pub mod disk {
    use super::{Error, Result};
    use std::path::Path;

    /// Writes an ext4 image of the tree at `dir` to `out`, preserving ownership, modes,
    /// symlinks, hardlinks, device nodes and xattrs, sized to fit with headroom.
    pub fn ext4_from_dir(_dir: &Path, _out: &Path) -> Result<()> {
        Err(Error::NotImplemented("disk::ext4_from_dir"))
    }
}
