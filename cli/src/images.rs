//! From `IMAGE` to what a run needs: the image config and the root filesystem disk, through the
//! `image` crate's store (`ImageStore::ensure`, `rootfs_disk`, `resolve_user`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use image::{Fetched, ImageConfiguration, ImageStore, PullOptions, User};

/// An image ready for a run.
pub struct RunImage {
    pub id: String,
    pub config: ImageConfiguration,
    pub disk: PathBuf,
    pub fstype: String,
    pub fetched: Fetched,
    pub disk_built: bool,
    stored: image::Image,
}

/// The store; `progress`: bars on stderr while pulling and unpacking.
pub fn open_store(progress: bool) -> Result<ImageStore> {
    let root = ImageStore::default_root();
    Ok(ImageStore::open(&root)
        .with_context(|| format!("open the image store {}", root.display()))?
        .with_progress(progress))
}

pub async fn prepare(store: &ImageStore, reference: &str, opts: &PullOptions) -> Result<RunImage> {
    let (img, fetched) = store
        .ensure(reference, opts)
        .await
        .with_context(|| format!("image {reference}"))?;
    let disk = store
        .rootfs_disk(&img)
        .with_context(|| format!("the root filesystem disk of {reference}"))?;
    Ok(RunImage {
        id: img.id.clone(),
        config: img.config.clone(),
        disk: disk.path,
        fstype: disk.fstype,
        fetched,
        disk_built: disk.built,
        stored: img,
    })
}

/// `-u`/the image's User as uid, gid and supplementary groups.
pub fn resolve_user(store: &ImageStore, img: &RunImage, user: &str) -> Result<User> {
    if user.is_empty() {
        return Ok(User {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
        });
    }
    store
        .resolve_user(&img.stored, user)
        .with_context(|| format!("user {user:?}"))
}
