//! Layers as they reach the disk: whiteouts and opaque directories across layers and
//! compressions; ownership, modes, links, device nodes and xattrs; a corrupted blob refused by
//! its digest.

mod common;

use common::*;
use image::{Error, PullOptions};

fn opts() -> PullOptions {
    PullOptions::default()
}

#[tokio::test]
async fn whiteouts_opaque_dirs_and_compressions_across_layers() {
    let (tmp, store) = store();
    let lower = Layer::new()
        .dir("a", 0o755, 0, 0)
        .file("a/keep", b"keep", 0o644, 0, 0)
        .file("a/gone", b"gone", 0o644, 0, 0)
        .dir("a/gonedir", 0o755, 0, 0)
        .file("a/gonedir/deep", b"deep", 0o644, 0, 0)
        .dir("b", 0o755, 0, 0)
        .file("b/old", b"old", 0o644, 0, 0)
        .dir("b/sub", 0o755, 0, 0)
        .file("b/sub/old2", b"old2", 0o644, 0, 0)
        .dir("c", 0o755, 0, 0)
        .file("c/x", b"x", 0o644, 0, 0)
        .file("replaced", b"a file first", 0o644, 0, 0)
        .finish();
    let upper = Layer::new()
        .dir("a", 0o755, 0, 0)
        .whiteout("a/.wh.gone")
        .whiteout("a/.wh.gonedir")
        .dir("b", 0o755, 0, 0)
        .dir("b/sub", 0o755, 0, 0)
        .file("b/sub/new2", b"new2", 0o644, 0, 0)
        .file("b/new", b"new", 0o644, 0, 0)
        .whiteout("b/.wh..wh..opq")
        .whiteout(".wh.c")
        .dir("replaced", 0o700, 0, 0)
        .finish();
    let top = Layer::new()
        .file("a/gone", b"back again", 0o600, 0, 0)
        .finish();
    let img = TestImage::new(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            compress(&lower, Compression::Zstd),
            compress(&upper, Compression::None),
            compress(&top, Compression::Gzip),
        ],
        &["/bin/sh"],
    );
    let layout = tmp.path().join("layers");
    img.write_layout(&layout, None);
    let (image, _) = store
        .ensure(layout.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(image.names, vec!["layers:latest".to_string()]);
    let disk = store.rootfs_disk(&image).unwrap().path;

    assert_eq!(cat(&disk, "/a/keep"), "keep");
    assert_eq!(
        cat(&disk, "/a/gone"),
        "back again",
        "re-added by a later layer"
    );
    assert!(
        stat(&disk, "/a/gonedir").is_none(),
        "a whited-out directory goes with its content"
    );
    assert!(
        stat(&disk, "/b/old").is_none(),
        "opaque: lower content hidden"
    );
    assert!(
        stat(&disk, "/b/sub/old2").is_none(),
        "opaque: lower content hidden, deeper too"
    );
    assert_eq!(
        cat(&disk, "/b/new"),
        "new",
        "opaque: the layer's own entries stay"
    );
    assert_eq!(cat(&disk, "/b/sub/new2"), "new2");
    assert!(stat(&disk, "/c").is_none());
    assert!(
        stat(&disk, "/b/.wh..wh..opq").is_none(),
        "whiteout markers are not files"
    );
    assert!(stat(&disk, "/a/.wh.gone").is_none());
    let replaced = stat(&disk, "/replaced").unwrap();
    assert_eq!(
        (replaced.kind.as_str(), replaced.mode),
        ("directory", 0o700)
    );
    // The busybox base came through its gzip layer.
    let busybox = stat(&disk, "/bin/busybox").unwrap();
    assert_eq!(
        busybox.size,
        std::fs::metadata("/bin/busybox").unwrap().len()
    );
}

#[tokio::test]
async fn ownership_modes_links_nodes_and_xattrs_reach_the_disk() {
    let (tmp, store) = store();
    // security.capability v2 for cap_net_raw (bit 13), effective.
    let cap: &[u8] = &[
        0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let layer = Layer::new()
        .dir("home", 0o755, 0, 0)
        .dir("home/alice", 0o700, 1000, 1000)
        .file("home/alice/notes", b"private", 0o640, 1000, 100)
        .file("bin/suid", b"#!/bin/sh\n", 0o4755, 0, 0)
        .file("bin/sgid", b"#!/bin/sh\n", 0o2711, 0, 50)
        .file_with_xattrs(
            "bin/ping",
            b"not really ping",
            0o755,
            &[("security.capability", cap), ("user.note", b"hi")],
        )
        .hardlink("bin/ping-link", "bin/ping")
        .hardlink("home/alice/notes-link", "/home/alice/notes")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .node("dev/null", tar::EntryType::Char, 1, 3)
        .node("dev/loop9", tar::EntryType::Block, 7, 9)
        .node("run/fifo", tar::EntryType::Fifo, 0, 0)
        .finish();
    let img = TestImage::new(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            compress(&layer, Compression::Gzip),
        ],
        &["/bin/sh"],
    );
    let layout = tmp.path().join("meta");
    img.write_layout(&layout, None);
    let (image, _) = store
        .ensure(layout.to_str().unwrap(), &opts())
        .await
        .unwrap();
    let disk = store.rootfs_disk(&image).unwrap().path;

    let root = stat(&disk, "/").unwrap();
    assert_eq!((root.uid, root.gid, root.mode), (0, 0, 0o755));
    let home = stat(&disk, "/home/alice").unwrap();
    assert_eq!((home.uid, home.gid, home.mode), (1000, 1000, 0o700));
    let notes = stat(&disk, "/home/alice/notes").unwrap();
    assert_eq!(
        (notes.uid, notes.gid, notes.mode, notes.links),
        (1000, 100, 0o640, 2)
    );
    assert!(
        notes.raw.contains(&format!("{MTIME:x}")),
        "mtime kept: {}",
        notes.raw
    );
    assert_eq!(
        stat(&disk, "/home/alice/notes-link").unwrap().inode,
        notes.inode
    );
    assert_eq!(stat(&disk, "/bin/suid").unwrap().mode, 0o4755);
    let sgid = stat(&disk, "/bin/sgid").unwrap();
    assert_eq!((sgid.mode, sgid.gid), (0o2711, 50));
    let ping = stat(&disk, "/bin/ping").unwrap();
    assert_eq!(ping.links, 2);
    assert_eq!(stat(&disk, "/bin/ping-link").unwrap().inode, ping.inode);
    let xattrs = debugfs(&disk, "ea_list /bin/ping");
    assert!(xattrs.contains("security.capability"), "{xattrs}");
    assert!(xattrs.contains("user.note"), "{xattrs}");
    let link = stat(&disk, "/etc/localtime").unwrap();
    assert_eq!(link.kind, "symlink");
    assert!(link.raw.contains("/usr/share/zoneinfo/UTC"), "{}", link.raw);
    let sh = stat(&disk, "/bin/sh").unwrap();
    assert!(sh.raw.contains("\"busybox\""), "{}", sh.raw);
    let null = stat(&disk, "/dev/null").unwrap();
    assert_eq!(null.kind, "character special");
    assert!(
        null.raw.contains("01:03") || null.raw.contains("1, 3"),
        "{}",
        null.raw
    );
    assert_eq!((null.gid, null.mode), (5, 0o620));
    assert_eq!(stat(&disk, "/dev/loop9").unwrap().kind, "block special");
    assert_eq!(stat(&disk, "/run/fifo").unwrap().kind, "FIFO");
    // Parents that no entry named were made 0755 root.
    let run = stat(&disk, "/run").unwrap();
    assert_eq!(
        (run.uid, run.mode, run.kind.as_str()),
        (0, 0o755, "directory")
    );
    assert_eq!(stat(&disk, "/tmp").unwrap().mode, 0o1777);
}

#[tokio::test]
async fn corrupted_blobs_are_refused_by_digest() {
    let (tmp, store) = store();
    let img = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::Gzip)],
        &["/bin/sh"],
    );
    let layer_digest = img.layers[0].digest.clone();

    // A layout whose layer blob had a byte flipped (same size).
    let layout = tmp.path().join("corrupt");
    img.write_layout(&layout, None);
    let blob = layout.join("blobs/sha256").join(&layer_digest[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let err = store
        .ensure(layout.to_str().unwrap(), &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&layer_digest) && message.contains("corrupt"),
        "{message}"
    );
    assert!(!store
        .root()
        .join("blobs/sha256")
        .join(&layer_digest[7..])
        .exists());
    assert!(store.list().unwrap().is_empty(), "nothing recorded");
    assert!(
        walk(&store.root().join("tmp")).is_empty(),
        "no temporary file left"
    );

    // A truncated blob: the size check.
    bytes.truncate(middle);
    std::fs::write(&blob, &bytes).unwrap();
    let err = store
        .ensure(layout.to_str().unwrap(), &opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&layer_digest) && err.contains("bytes"),
        "{err}"
    );

    // A docker-archive whose layer tar does not match its diff id.
    let plain = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        &["/bin/sh"],
    );
    let mut tampered = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        &["/bin/sh"],
    );
    let n = tampered.layers[0].bytes.len();
    tampered.layers[0].bytes[n - 2000] ^= 0x01; // inside busybox's data or padding
    let archive = tmp.path().join("tampered.tar");
    tampered.write_docker_archive(&archive, &["tampered:1"]);
    let err = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&plain.layers[0].diff_id) && err.contains("corrupt"),
        "{err}"
    );

    // A config that is not an image config: refused, and not recorded.
    let odd = TestImage::with_config(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        br#"{"architecture": 5}"#.to_vec(),
    );
    let odd_dir = tmp.path().join("odd");
    odd.write_layout(&odd_dir, None);
    let err = store
        .ensure(odd_dir.to_str().unwrap(), &opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&sha256(&odd.config)), "{err}");
    assert!(store.list().unwrap().is_empty());

    // A manifest that is not JSON at all.
    let junk = tmp.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("index.json"), b"{not json").unwrap();
    let err = store
        .ensure(junk.to_str().unwrap(), &opts())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("index.json"), "{err}");
}
