//! The store's directories are 0700 and its files 0600 whatever the umask (this binary sets
//! umask 000, so a mode that came from the umask would show as 0777/0666), and a store whose
//! root is a symlink is refused.

mod common;

use common::*;
use image::{ImageStore, PullOptions};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn store_files_and_directories_are_owner_only_under_umask_000() {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0) };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home/images");
    let store = ImageStore::open(&root).unwrap();
    let img = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::Gzip)],
        &["/bin/sh"],
    );
    let layout = tmp.path().join("layout");
    img.write_layout(&layout, Some("v1"));
    let (image, _) = store
        .ensure(layout.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap();
    let disk = store.rootfs_disk(&image).unwrap();
    store.resolve_user(&image, "").unwrap();

    let mut checked = 0;
    for path in [tmp.path().join("home"), root.clone()]
        .into_iter()
        .chain(walk(&root))
    {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&path), want, "{}", path.display());
        checked += 1;
    }
    for must in [
        disk.path.clone(),
        root.join("images.json"),
        root.join("store.lock"),
        root.join("index.lock"),
        root.join("disks"),
        root.join("blobs/sha256"),
        root.join("tmp"),
    ] {
        assert!(must.exists(), "{} missing", must.display());
    }
    assert!(checked > 10, "only {checked} paths");
}

#[test]
fn a_symlinked_store_root_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("images");
    symlink(&real, &link).unwrap();
    let err = ImageStore::open(&link).unwrap_err().to_string();
    assert!(err.contains("symlink") && err.contains("images"), "{err}");
    assert!(
        walk(&real).is_empty(),
        "something was made through the link"
    );
}
