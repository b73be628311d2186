//! The local OCI image store behind `microvm run`, `pull`, `images` and `rmi`.
//!
//! Images come from a registry (the distribution API through `oci-client`), an OCI image
//! layout directory, or an OCI / docker-archive tarball. Their blobs live content-addressed
//! under `<root>/blobs/sha256/<hex>`, each verified by digest and size before it is committed.
//! [`ImageStore::rootfs_disk`] applies an image's layers (with OCI whiteouts, refusing entries
//! that would escape the root) and turns the tree into a read-only ext4 disk, cached by image
//! id. See `image/README.md` for the layout on disk and the choices behind it.

use std::path::{Path, PathBuf};

pub use oci_spec::image::ImageConfiguration;

mod blob;
#[doc(hidden)]
pub mod fuzzing;
mod import;
mod index;
mod manifest;
pub mod owner_only;
mod pull;
mod unpack;
mod user;

pub use unpack::UnpackLimits;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not implemented yet: {0}")]
    NotImplemented(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("{reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("{registry}: authentication failed (wrong or missing credentials?): {message}")]
    Unauthorized { registry: String, message: String },
    #[error("blob {digest} from {origin} is corrupted: {reason}")]
    CorruptBlob {
        digest: String,
        origin: String,
        reason: String,
    },
    #[error("{origin}: {reason}")]
    InvalidImage { origin: String, reason: String },
    #[error("layer {layer}: refusing entry {entry:?}: {reason}")]
    UnsafeLayer {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("{what} {digest} is {size} bytes, more than the {limit} bytes a {what} may have")]
    TooLarge {
        what: &'static str,
        digest: String,
        size: u64,
        limit: u64,
    },
    #[error("no image named {0:?} in the store")]
    NotFound(String),
    #[error("{0:?} matches more than one image id")]
    Ambiguous(String),
    #[error("user {user:?}: {reason}")]
    User { user: String, reason: String },
    #[error("building the ext4 disk {out}: {message}")]
    Mkfs { out: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with what was being done, so messages name the file.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

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
    limits: UnpackLimits,
    progress: bool,
}

impl ImageStore {
    /// Where the store lives unless told otherwise: `$MICROVM_HOME/images`, else
    /// `/var/lib/microvm/images` for root, else `~/.local/share/microvm/images`.
    pub fn default_root() -> PathBuf {
        if let Some(h) = std::env::var_os("MICROVM_HOME") {
            return PathBuf::from(h).join("images");
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            if let Some(home) = std::env::var_os("HOME") {
                return PathBuf::from(home).join(".local/share/microvm/images");
            }
        }
        PathBuf::from("/var/lib/microvm/images")
    }

    /// Opens (creating it when missing) the store at `root`. Its directories are made 0700 and
    /// its files 0600; a root (or subdirectory) that is a symlink or another user's is refused.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        owner_only::ensure_dir(&root).map_err(io_err(format!(
            "opening the image store {}",
            root.display()
        )))?;
        for sub in ["blobs", "blobs/sha256", "disks", "tmp"] {
            let dir = root.join(sub);
            owner_only::ensure_dir(&dir)
                .map_err(io_err(format!("opening the image store {}", dir.display())))?;
        }
        Ok(Self {
            root,
            limits: UnpackLimits::default(),
            progress: false,
        })
    }

    /// The same store with other limits for unpacking layers.
    pub fn with_unpack_limits(mut self, limits: UnpackLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The same store showing progress bars on stderr while it unpacks layers in
    /// [`ImageStore::rootfs_disk`] (pulls and imports follow [`PullOptions::progress`]).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `IMAGE` as `microvm run` takes it: an existing directory is an OCI image layout, an
    /// existing file an OCI or docker-archive tarball, anything else a registry reference.
    /// Fetches only what the store lacks. A name or id of an image already in the store is
    /// used as stored, without asking a registry (docker run's behaviour); use
    /// [`ImageStore::pull`] to look a tag up again.
    pub async fn ensure(&self, image: &str, opts: &PullOptions) -> Result<(Image, Fetched)> {
        let path = Path::new(image);
        if path.is_dir() {
            let _lock = self.shared_lock()?;
            return import::import_layout_dir(self, path, opts);
        }
        if path.is_file() {
            let _lock = self.shared_lock()?;
            return import::import_archive(self, path, opts);
        }
        // A name the store knows (`busybox` for `docker.io/library/busybox:latest`, an
        // imported layout's `my-image:v1`, an id or id prefix) is used as stored.
        if let Some(found) = self.get(image)? {
            return Ok((found, Fetched::default()));
        }
        let reference = pull::parse_reference(image)?;
        let _lock = self.shared_lock()?;
        pull::pull(self, &reference, opts).await
    }

    /// `microvm pull`: resolves the reference against its registry even when the store has an
    /// image of that name, then fetches the blobs the store lacks (none when the tag did not
    /// move). Paths (layout directories, archives) are imported as [`ImageStore::ensure`] does.
    pub async fn pull(&self, image: &str, opts: &PullOptions) -> Result<(Image, Fetched)> {
        let path = Path::new(image);
        if path.exists() {
            return self.ensure(image, opts).await;
        }
        let reference = pull::parse_reference(image)?;
        let _lock = self.shared_lock()?;
        pull::pull(self, &reference, opts).await
    }

    /// Looks an image up by name, id or unambiguous id prefix.
    pub fn get(&self, name_or_id: &str) -> Result<Option<Image>> {
        let index = index::Index::load(self)?;
        match index.find(name_or_id)? {
            Some(record) => Ok(Some(self.image_of(record)?)),
            None => Ok(None),
        }
    }

    pub fn list(&self) -> Result<Vec<Image>> {
        let index = index::Index::load(self)?;
        index.images.iter().map(|r| self.image_of(r)).collect()
    }

    /// Removes a name; the image's blobs and disk go with its last name. An id (or id
    /// prefix) removes the image with all its names.
    pub fn remove(&self, name_or_id: &str) -> Result<()> {
        let _store = self.exclusive_lock()?;
        let _index = self.index_lock()?;
        self.sweep_tmp();
        let mut index = index::Index::load(self)?;
        let Some((record, matched_name)) = index.find_match(name_or_id)? else {
            return Err(Error::NotFound(name_or_id.to_string()));
        };
        let id = record.id.clone();
        let record = index
            .images
            .iter_mut()
            .find(|r| r.id == id)
            .expect("found above");
        match matched_name {
            Some(name) => record.names.retain(|n| *n != name),
            None => record.names.clear(),
        }
        if record.names.is_empty() {
            index.images.retain(|r| r.id != id);
            index.save(self)?;
            self.collect_garbage(&index, &id)?;
        } else {
            index.save(self)?;
        }
        Ok(())
    }

    /// The image's root filesystem disk, built from its layers on first use and cached by
    /// image id.
    pub fn rootfs_disk(&self, image: &Image) -> Result<RootfsDisk> {
        let _lock = self.shared_lock()?;
        let index = index::Index::load(self)?;
        let record = index
            .images
            .iter()
            .find(|r| r.id == image.id)
            .ok_or_else(|| Error::NotFound(image.id.clone()))?;
        let hex = blob::digest_hex(&record.id)?;
        let path = self.root.join("disks").join(format!("{hex}.ext4"));
        let users = self.users_path(hex);
        let cached = || path.is_file() && users.is_file();
        if !cached() {
            // One build per image at a time, across processes; a waiter finds it done.
            let _building = FileLock::take(&self.disk_lock_path(hex), libc::LOCK_EX)?;
            if !cached() {
                unpack::build_disk(self, record, &path, &users)?;
                return Ok(RootfsDisk {
                    path,
                    fstype: "ext4".into(),
                    built: true,
                });
            }
        }
        Ok(RootfsDisk {
            path,
            fstype: "ext4".into(),
            built: false,
        })
    }

    fn disk_lock_path(&self, hex: &str) -> PathBuf {
        self.root.join("disks").join(format!("{hex}.lock"))
    }

    /// Resolves `user`, `uid`, `user:group` or `uid:gid` against the image's /etc/passwd and
    /// /etc/group.
    pub fn resolve_user(&self, image: &Image, user: &str) -> Result<User> {
        let hex = blob::digest_hex(&image.id)?;
        let users = self.users_path(hex);
        if !users.is_file() {
            // The two files are saved while the disk is built; build it now (the caller
            // needs it to run the image anyway).
            self.rootfs_disk(image)?;
        }
        let db = user::UserDb::load(&users)?;
        db.resolve(user)
    }

    fn users_path(&self, hex: &str) -> PathBuf {
        self.root.join("disks").join(format!("{hex}.users.json"))
    }

    pub(crate) fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn image_of(&self, record: &index::ImageRecord) -> Result<Image> {
        let config_bytes = blob::read_blob(
            self,
            &record.config.digest,
            "config",
            blob::MAX_CONFIG_BYTES,
        )?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::InvalidImage {
                origin: format!("config {}", record.config.digest),
                reason: e.to_string(),
            })?;
        Ok(Image {
            id: record.id.clone(),
            names: record.names.clone(),
            config,
            size: record.layers.iter().map(|l| l.size).sum(),
        })
    }

    /// Deletes the blobs, disk and user database of the image `gone_id` that no remaining
    /// image needs. Runs under the exclusive store lock, so no import is half way.
    fn collect_garbage(&self, index: &index::Index, gone_id: &str) -> Result<()> {
        let live: std::collections::HashSet<&str> = index
            .images
            .iter()
            .flat_map(|r| {
                std::iter::once(r.id.as_str())
                    .chain(std::iter::once(r.config.digest.as_str()))
                    .chain(r.layers.iter().map(|l| l.digest.as_str()))
            })
            .collect();
        let dir = self.root.join("blobs/sha256");
        let entries =
            std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
            let name = entry.file_name();
            let digest = format!("sha256:{}", name.to_string_lossy());
            if !live.contains(digest.as_str()) {
                let path = entry.path();
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("removing {}", path.display())))?;
            }
        }
        let hex = blob::digest_hex(gone_id)?;
        for path in [
            self.root.join("disks").join(format!("{hex}.ext4")),
            self.users_path(hex),
            self.disk_lock_path(hex),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
            }
        }
        Ok(())
    }

    /// Removes what killed imports and builds left in `tmp/`. Only under the exclusive store
    /// lock: every writer of `tmp/` holds the shared one.
    fn sweep_tmp(&self) {
        let Ok(entries) = std::fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let gone = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if let Err(e) = gone {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover");
            }
        }
    }

    /// Held while blobs are added or a disk is built: many at once, but never during a
    /// removal's garbage collection.
    fn shared_lock(&self) -> Result<FileLock> {
        FileLock::take(&self.root.join("store.lock"), libc::LOCK_SH)
    }

    fn exclusive_lock(&self) -> Result<FileLock> {
        FileLock::take(&self.root.join("store.lock"), libc::LOCK_EX)
    }

    /// Held for each read-modify-write of the index file.
    pub(crate) fn index_lock(&self) -> Result<FileLock> {
        FileLock::take(&self.root.join("index.lock"), libc::LOCK_EX)
    }
}

/// An advisory `flock` on a file in the store, released on drop (when the file closes).
pub(crate) struct FileLock {
    file: std::fs::File,
}

impl FileLock {
    fn take(path: &Path, how: libc::c_int) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let file = owner_only::file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), how) };
            if rc == 0 {
                return Ok(Self { file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err(format!("locking {}", path.display()))(err));
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // Unlock before the close: a thread of this process that forked just now (to spawn a
        // VMM, say) holds a copy of the descriptor until its child's exec, and a lock outlives
        // a close while such a copy exists.
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Building a filesystem image from a directory tree (also used by the containerd shim for
/// snapshotter rootfs trees).
pub mod disk;

/// A progress bar on stderr for `len` bytes, or a hidden one when progress is off.
pub(crate) fn progress_bar(show: bool, len: u64, message: String) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}

/// A short form of a digest for messages and progress bars.
pub(crate) fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
