//! `image::owner_only` and the store built on it: directories 0700 and files 0600 whatever the
//! umask (this binary sets umask 000, so a mode that came from the umask would show as
//! 0777/0666), symlinked, foreign or non-directory state directories refused, no write
//! through a symlink.

mod common;

use common::*;
use image::owner_only::{create_dir, ensure_dir, file_options, write_atomic};
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

fn umask_000() {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0) };
}

#[test]
fn made_with_owner_only_modes() {
    umask_000();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/state");
    ensure_dir(&dir).unwrap();
    for d in [tmp.path().join("a"), tmp.path().join("a/b"), dir.clone()] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    ensure_dir(&dir).unwrap(); // present: fine
    let file = dir.join("run.json");
    write_atomic(&file, b"{}").unwrap();
    write_atomic(&file, b"{\"x\":1}").unwrap();
    assert_eq!(mode(&file), 0o600);
    assert_eq!(std::fs::read(&file).unwrap(), b"{\"x\":1}");
    assert!(!dir.join("run.json.tmp").exists());
    create_dir(&dir.join("one")).unwrap();
    assert_eq!(mode(&dir.join("one")), 0o700);
    assert!(create_dir(&dir.join("one")).is_err());
}

#[test]
fn symlinked_or_foreign_or_non_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    ensure_dir(&real).unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    let e = ensure_dir(&link).unwrap_err().to_string();
    assert!(e.contains("symlink") && e.contains("link"), "{e}");

    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let e = ensure_dir(&file).unwrap_err().to_string();
    assert!(e.contains("not a directory"), "{e}");

    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    // SAFETY: geteuid has no preconditions.
    let other = unsafe { libc::geteuid() } + 1;
    std::os::unix::fs::chown(&foreign, Some(other), None).unwrap();
    let e = ensure_dir(&foreign).unwrap_err().to_string();
    assert!(e.contains("belongs to uid"), "{e}");
}

#[test]
fn a_symlink_at_a_file_path_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::write(&target, "keep").unwrap();
    let path = tmp.path().join("state.json");
    symlink(&target, &path).unwrap();
    let e = file_options().write(true).open(&path).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    // write_atomic replaces the link itself, never writes through it.
    write_atomic(&path, b"new").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(!std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[tokio::test]
async fn store_files_and_directories_are_owner_only_under_umask_000() {
    umask_000();
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
