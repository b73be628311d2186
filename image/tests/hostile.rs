//! Hostile layers: each is refused with an error naming the layer and the entry, and nothing
//! is written outside the store's temporary directory (a canary directory outside the store
//! stays empty, and the store holds no stray file).

mod common;

use common::*;
use image::{Error, ImageStore, PullOptions, UnpackLimits};
use std::path::Path;

struct Case {
    what: &'static str,
    layer: Vec<u8>,
    /// Words the error must contain besides the layer digest and the entry.
    entry: &'static str,
    reason: &'static str,
}

async fn refused(store: &ImageStore, tmp: &Path, case: &Case, canary: &Path) {
    let hostile = compress(&case.layer, Compression::Gzip);
    let digest = hostile.digest.clone();
    let img = TestImage::new(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            hostile,
        ],
        &["/bin/sh"],
    );
    let layout = tmp.join(case.what.replace(' ', "-"));
    img.write_layout(&layout, None);
    let (image, _) = store
        .ensure(layout.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap();
    let err = store.rootfs_disk(&image).unwrap_err();
    assert!(
        matches!(err, Error::UnsafeLayer { .. }),
        "{}: {err:?}",
        case.what
    );
    let message = err.to_string();
    eprintln!("{}: {message}", case.what);
    assert!(
        message.contains(&digest),
        "{}: the layer is named: {message}",
        case.what
    );
    assert!(
        message.contains(case.entry),
        "{}: the entry is named: {message}",
        case.what
    );
    assert!(
        message.contains(case.reason),
        "{}: the reason is given: {message}",
        case.what
    );
    let in_canary: Vec<_> = walk(canary)
        .into_iter()
        .filter(|p| !p.ends_with("keep"))
        .collect();
    assert!(
        in_canary.is_empty(),
        "{}: nothing new in the canary: {in_canary:?}",
        case.what
    );
    let stray: Vec<_> = walk(store.root())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.contains("escape") || name.contains("pwned")
        })
        .collect();
    assert!(stray.is_empty(), "{}: {stray:?}", case.what);
    assert!(
        walk(&store.root().join("tmp")).is_empty(),
        "{}: the unpack dir is removed",
        case.what
    );
    let disks: Vec<_> = walk(&store.root().join("disks"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(disks.is_empty(), "{}: no disk: {disks:?}", case.what);
    store.remove(&image.id).unwrap();
    assert!(
        walk(&store.root().join("disks")).is_empty(),
        "{}: the build lock goes too",
        case.what
    );
}

#[tokio::test]
async fn hostile_layers_are_refused_and_write_nothing_outside() {
    let (tmp, store) = store();
    let canary = tempfile::tempdir().unwrap();
    let canary_path = canary.path().to_str().unwrap().to_string();
    let deep_escape = format!("../../../../../../../../../..{canary_path}/escape");
    let cases = [
        Case {
            what: "dotdot path",
            layer: Layer::new()
                .raw("../escape", tar::EntryType::Regular, None, b"x")
                .finish(),
            entry: "../escape",
            reason: "`..`",
        },
        Case {
            what: "deep dotdot path to the canary",
            layer: Layer::new()
                .raw(&deep_escape, tar::EntryType::Regular, None, b"x")
                .finish(),
            entry: "escape",
            reason: "`..`",
        },
        Case {
            what: "dotdot directory",
            layer: Layer::new()
                .raw("a/../../escape/", tar::EntryType::Directory, None, b"")
                .finish(),
            entry: "a/../../escape",
            reason: "`..`",
        },
        Case {
            what: "absolute symlink then a file through it",
            layer: Layer::new()
                .symlink("evil", &canary_path)
                .file("evil/pwned", b"x", 0o644, 0, 0)
                .finish(),
            entry: "evil/pwned",
            reason: "symlink",
        },
        Case {
            what: "relative symlink out then a file through it",
            layer: Layer::new()
                .dir("d", 0o755, 0, 0)
                .symlink("d/up", "../../../../../../../../..")
                .file(&format!("d/up{canary_path}/pwned"), b"x", 0o644, 0, 0)
                .finish(),
            entry: "pwned",
            reason: "symlink",
        },
        Case {
            what: "symlink then a directory through it",
            layer: Layer::new()
                .symlink("evil", &canary_path)
                .dir("evil/pwned", 0o755, 0, 0)
                .finish(),
            entry: "evil/pwned",
            reason: "symlink",
        },
        Case {
            what: "symlink then a hardlink through it",
            layer: Layer::new()
                .symlink("evil", &canary_path)
                .hardlink("evil/pwned", "etc/passwd")
                .finish(),
            entry: "evil/pwned",
            reason: "symlink",
        },
        Case {
            what: "whiteout through a symlink",
            layer: Layer::new()
                .symlink("evil", &canary_path)
                .whiteout("evil/.wh.keep")
                .finish(),
            entry: "evil/.wh.keep",
            reason: "symlink",
        },
        Case {
            what: "hardlink to dotdot",
            layer: Layer::new()
                .raw("pwned", tar::EntryType::Link, Some("../x"), b"")
                .finish(),
            entry: "pwned",
            reason: "`..`",
        },
        Case {
            what: "hardlink to a host file absent from the image",
            layer: Layer::new().hardlink("pwned", "/etc/shadow").finish(),
            entry: "pwned",
            reason: "does not exist in the image",
        },
        Case {
            what: "hardlink target through a symlink",
            layer: Layer::new()
                .symlink("hostetc", "/etc")
                .hardlink("pwned", "hostetc/hostname")
                .finish(),
            entry: "pwned",
            reason: "symlink",
        },
        Case {
            what: "hardlink to a directory",
            layer: Layer::new().hardlink("pwned", "etc").finish(),
            entry: "pwned",
            reason: "directory",
        },
    ];
    // The canary must hold something we could lose: a file a whiteout would delete.
    let keep = canary.path().join("keep");
    std::fs::write(&keep, b"keep").unwrap();
    for case in &cases {
        refused(&store, tmp.path(), case, canary.path()).await;
        std::fs::remove_file(&keep).expect("the canary's file survived");
        std::fs::write(&keep, b"keep").unwrap();
    }
    assert!(!Path::new("/escape").exists());
}

#[tokio::test]
async fn absurd_sizes_are_refused_by_the_limits() {
    let (tmp, store) = store();
    let store = store.with_unpack_limits(UnpackLimits {
        max_entries: 50,
        max_total_bytes: 8 << 20,
        max_entry_bytes: 4 << 20,
        max_header_bytes: 1 << 20,
    });
    let canary = tempfile::tempdir().unwrap();

    let big = vec![0u8; (4 << 20) + 1];
    refused(
        &store,
        tmp.path(),
        &Case {
            what: "one file too big",
            layer: Layer::new().file("big", &big, 0o644, 0, 0).finish(),
            entry: "big",
            reason: "bytes a file may have",
        },
        canary.path(),
    )
    .await;

    let three_mib = vec![7u8; 3 << 20];
    refused(
        &store,
        tmp.path(),
        &Case {
            what: "too much in all",
            layer: Layer::new()
                .file("one", &three_mib, 0o644, 0, 0)
                .file("two", &three_mib, 0o644, 0, 0)
                .file("three", &three_mib, 0o644, 0, 0)
                .finish(),
            entry: "three",
            reason: "unpacks to more than",
        },
        canary.path(),
    )
    .await;

    let mut many = Layer::new();
    for i in 0..60 {
        many = many.file(&format!("f{i}"), b"", 0o644, 0, 0);
    }
    refused(
        &store,
        tmp.path(),
        &Case {
            what: "too many entries",
            layer: many.finish(),
            entry: "f",
            reason: "more than 50 entries",
        },
        canary.path(),
    )
    .await;
}

#[tokio::test]
async fn a_layer_that_is_not_a_tar_is_a_clear_error() {
    let (tmp, store) = store();
    let junk = compress(&[b'x'; 2048], Compression::Zstd);
    let digest = junk.digest.clone();
    let img = TestImage::new(vec![junk], &["/bin/sh"]);
    let layout = tmp.path().join("junk");
    img.write_layout(&layout, None);
    let (image, _) = store
        .ensure(layout.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap();
    let err = store.rootfs_disk(&image).unwrap_err().to_string();
    assert!(err.contains(&digest), "{err}");
    assert!(walk(&store.root().join("tmp")).is_empty());
}

/// PAX extensions and GNU long names/link targets are held in memory by the tar reader before
/// their entry is seen: past `max_header_bytes` the layer is refused while they are read, and
/// records within the bound still unpack.
#[tokio::test]
async fn oversized_header_records_are_refused() {
    let (tmp, store) = store();
    let store = store.with_unpack_limits(UnpackLimits {
        max_header_bytes: 64 << 10,
        ..UnpackLimits::default()
    });
    let canary = tempfile::tempdir().unwrap();
    let huge = vec![b'a'; 200 << 10];
    let cases = [
        Case {
            what: "huge GNU long name",
            layer: Layer::new()
                .file("before", b"ok", 0o644, 0, 0)
                .raw("././@LongLink", tar::EntryType::GNULongName, None, &huge)
                .file("after", b"x", 0o644, 0, 0)
                .finish(),
            entry: "the one after before",
            reason: "more than 65536 bytes",
        },
        Case {
            what: "huge GNU long link",
            layer: Layer::new()
                .file("before", b"ok", 0o644, 0, 0)
                .raw("././@LongLink", tar::EntryType::GNULongLink, None, &huge)
                .symlink("after", "x")
                .finish(),
            entry: "the one after before",
            reason: "header records",
        },
        Case {
            what: "huge PAX extension",
            layer: Layer::new()
                .file_with_xattrs("first", b"x", 0o644, &[("user.big", &huge)])
                .finish(),
            entry: "the first",
            reason: "PAX extensions",
        },
    ];
    for case in &cases {
        refused(&store, tmp.path(), case, canary.path()).await;
    }

    // Within the bound: a 3 KiB xattr (what fits an ext4 block) and a 304-byte path (a GNU long
    // name record).
    let long_name = format!("d/{}/{}", "n".repeat(200), "m".repeat(100));
    let value = vec![b'v'; 3 << 10];
    let fine = Layer::new()
        .file_with_xattrs("with-xattr", b"x", 0o644, &[("user.big", &value)])
        .file(&long_name, b"long\n", 0o644, 0, 0)
        .finish();
    let img = TestImage::new(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            compress(&fine, Compression::Gzip),
        ],
        &["/bin/sh"],
    );
    let layout = tmp.path().join("fine");
    img.write_layout(&layout, None);
    let (image, _) = store
        .ensure(layout.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap();
    let disk = store.rootfs_disk(&image).unwrap().path;
    assert_eq!(cat(&disk, &format!("/{long_name}")), "long\n");
    let xattrs = debugfs(&disk, "ea_list /with-xattr");
    assert!(xattrs.contains("user.big"), "{xattrs}");
}

/// Configs and manifests are held in memory whole: one past its limit (8 MiB for a config,
/// 4 MiB for a manifest) is refused by its descriptor's size before anything is read or
/// stored, with an error naming its digest; a docker-archive's config by the member's size.
#[tokio::test]
async fn oversized_configs_and_manifests_are_refused_by_digest() {
    let (tmp, store) = store();
    let big_config = TestImage::with_oversized_config();
    let layout = tmp.path().join("big-config");
    big_config.write_layout(&layout, None);
    let err = store
        .ensure(layout.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap_err();
    let config_digest = sha256(&big_config.config);
    match &err {
        Error::TooLarge {
            what: "config",
            digest,
            limit,
            ..
        } => assert_eq!((digest, *limit), (&config_digest, 8 << 20)),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&config_digest), "{err}");

    // The same config in a docker-archive.
    let archive = tmp.path().join("big-config.tar");
    big_config.write_docker_archive(&archive, &["big:1"]);
    let err = store
        .ensure(archive.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&config_digest[7..]) && err.contains("more than the 8388608 bytes"),
        "{err}"
    );

    // A manifest of 5 MiB (one huge annotation).
    let mut small = TestImage::new(Vec::new(), &["/bin/sh"]);
    let mut manifest: serde_json::Value = serde_json::from_slice(&small.manifest).unwrap();
    manifest["annotations"] = serde_json::json!({"pad": "y".repeat(5 << 20)});
    small.manifest = serde_json::to_vec(&manifest).unwrap();
    let layout = tmp.path().join("big-manifest");
    small.write_layout(&layout, None);
    let err = store
        .ensure(layout.to_str().unwrap(), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::TooLarge { what: "manifest", digest, .. } if *digest == small.id()),
        "{err:?}"
    );

    assert!(store.list().unwrap().is_empty());
    assert!(
        walk(&store.root().join("blobs/sha256")).is_empty(),
        "a blob was stored"
    );
}
