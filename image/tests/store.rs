//! The store with images built here: imports from an OCI layout, an OCI archive and a
//! docker-archive; layers applied (compressions, whiteouts, metadata) into the ext4 disk; the
//! cache; names; corrupted blobs; users.

mod common;

use common::*;
use image::{Error, Fetched, PullOptions};

fn opts() -> PullOptions {
    PullOptions::default()
}

/// A second layer, zstd-compressed, on the gzip busybox base.
fn two_layer_image() -> TestImage {
    let base = compress(&busybox_layer().finish(), Compression::Gzip);
    let top = compress(
        &Layer::new()
            .dir("etc", 0o755, 0, 0)
            .file("etc/motd", b"second layer\n", 0o644, 0, 0)
            .finish(),
        Compression::Zstd,
    );
    TestImage::new(vec![base, top], &["/bin/sh", "-c", "echo hi"])
}

#[tokio::test]
async fn imports_layout_archive_and_docker_archive_then_caches() {
    let (tmp, store) = store();
    let img = two_layer_image();
    let layout = tmp.path().join("my-image");
    img.write_layout(&layout, Some("v1"));

    // OCI layout directory: manifest, config and two layers come in.
    let (first, fetched) = store
        .ensure(layout.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(first.id, img.id());
    assert_eq!(
        fetched,
        Fetched {
            blobs_downloaded: 0,
            blobs_imported: 4
        }
    );
    assert_eq!(first.names, vec!["my-image:v1".to_string()]);
    let config = first.config.config().as_ref().unwrap();
    assert_eq!(
        config.cmd().as_ref().unwrap(),
        &vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()]
    );
    assert_eq!(config.user().as_deref(), Some("alice"));
    assert_eq!(
        first.size,
        img.layers.iter().map(|l| l.bytes.len() as u64).sum::<u64>()
    );

    // The same layout again: nothing to import.
    let (again, fetched) = store
        .ensure(layout.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(fetched, Fetched::default());

    // The same image as an OCI archive: same id, nothing new, the archive's name added.
    let archive = tmp.path().join("Other Name.tar");
    tar_layout(&layout, &archive);
    let fresh = tempfile::tempdir().unwrap();
    let other_store = image::ImageStore::open(fresh.path()).unwrap();
    let (from_archive, fetched) = other_store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(from_archive.id, img.id());
    assert_eq!(
        fetched.blobs_imported, 4,
        "a fresh store imports all four blobs from the archive"
    );
    assert_eq!(from_archive.names, vec!["other-name:v1".to_string()]);
    let (_, fetched) = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(fetched, Fetched::default());

    // docker-archive (uncompressed layers): a manifest is made for it; RepoTags are the names.
    let plain = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        &["/bin/sh"],
    );
    let docker = tmp.path().join("saved.tar");
    plain.write_docker_archive(&docker, &["busybox:saved", "example.com:5000/team/bb:1"]);
    let (saved, fetched) = store
        .ensure(docker.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(fetched.blobs_imported, 3, "config, layer, made-up manifest");
    assert_eq!(
        saved.names,
        vec![
            "docker.io/library/busybox:saved".to_string(),
            "example.com:5000/team/bb:1".into()
        ]
    );
    let (_, fetched) = store
        .ensure(docker.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(fetched, Fetched::default());

    // Lookups.
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(store.get("busybox:saved").unwrap().unwrap().id, saved.id);
    assert_eq!(
        store
            .get("docker.io/library/busybox:saved")
            .unwrap()
            .unwrap()
            .id,
        saved.id
    );
    assert_eq!(store.get(&saved.id[..19]).unwrap().unwrap().id, saved.id);
    assert_eq!(store.get(&saved.id[7..19]).unwrap().unwrap().id, saved.id);
    assert_eq!(store.get("other-name:v1").unwrap().unwrap().id, first.id);
    assert!(store.get("nothing-here").unwrap().is_none());

    // The disk: built once, then from the cache.
    let disk = store.rootfs_disk(&first).unwrap();
    assert!(disk.built);
    assert_eq!(disk.fstype, "ext4");
    assert!(disk.path.starts_with(store.root()));
    assert_eq!(cat(&disk.path, "/etc/motd"), "second layer\n");
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk.path)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        std::fs::read(&disk.path).unwrap().len() as u64,
        std::fs::metadata(&disk.path).unwrap().len()
    );
    let modified = std::fs::metadata(&disk.path).unwrap().modified().unwrap();
    let cached = store.rootfs_disk(&first).unwrap();
    assert!(!cached.built);
    assert_eq!(cached.path, disk.path);
    assert_eq!(
        std::fs::metadata(&disk.path).unwrap().modified().unwrap(),
        modified
    );
    // The unpack directory is gone.
    assert!(
        walk(&store.root().join("tmp")).is_empty(),
        "{:?}",
        walk(&store.root().join("tmp"))
    );

    // Users from the image's /etc/passwd and /etc/group.
    let alice = store.resolve_user(&first, "alice").unwrap();
    assert_eq!(
        (alice.uid, alice.gid, alice.additional_gids),
        (1000, 1000, vec![100, 10])
    );
    let bob = store.resolve_user(&first, "bob:wheel").unwrap();
    assert_eq!((bob.uid, bob.gid, bob.additional_gids), (1001, 10, vec![]));
    let nobody = store.resolve_user(&first, "4242:4343").unwrap();
    assert_eq!((nobody.uid, nobody.gid), (4242, 4343));
    let err = store
        .resolve_user(&first, "mallory")
        .unwrap_err()
        .to_string();
    assert!(err.contains("mallory"), "{err}");
    // resolve_user before any disk exists builds it (the saved user files come with it).
    let user = store.resolve_user(&saved, "alice").unwrap();
    assert_eq!(user.uid, 1000);
    assert!(!store.rootfs_disk(&saved).unwrap().built);
}

#[tokio::test]
async fn newer_docker_save_with_an_oci_layout_inside() {
    let (tmp, store) = store();
    let img = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        &["/bin/sh"],
    );
    let layout = tmp.path().join("layout");
    img.write_layout(&layout, Some("docker.io/library/newsave:2"));
    // docker 25+ writes manifest.json (with RepoTags and blob paths) next to the layout.
    let manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", &sha256(&img.config)[7..]),
        "RepoTags": ["newsave:2"],
        "Layers": [format!("blobs/sha256/{}", &img.layers[0].digest[7..])],
    }]);
    std::fs::write(
        layout.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let archive = tmp.path().join("newsave.tar");
    tar_layout(&layout, &archive);
    let (image, fetched) = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(image.id, img.id(), "the OCI layout inside is preferred");
    assert_eq!(fetched.blobs_imported, 3);
    assert_eq!(image.names, vec!["docker.io/library/newsave:2".to_string()]);
}

#[tokio::test]
async fn gzipped_docker_save_is_read() {
    let (tmp, store) = store();
    let img = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        &["/bin/sh"],
    );
    let plain = tmp.path().join("plain.tar");
    img.write_docker_archive(&plain, &[]);
    let gz = tmp.path().join("busybox-save.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::copy(&mut std::fs::File::open(&plain).unwrap(), &mut enc).unwrap();
    enc.finish().unwrap();
    let (image, _) = store.ensure(gz.to_str().unwrap(), &opts()).await.unwrap();
    assert_eq!(
        image.names,
        vec!["busybox-save:latest".to_string()],
        "no RepoTags: named after the file"
    );
    assert!(
        walk(&store.root().join("tmp")).is_empty(),
        "the decompressed copy is removed"
    );
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

#[tokio::test]
async fn remove_drops_names_then_blobs_and_disk_with_the_last() {
    let (tmp, store) = store();
    let shared_base = compress(&busybox_layer().finish(), Compression::Gzip);
    let one = TestImage::new(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            compress(
                &Layer::new().file("one", b"1", 0o644, 0, 0).finish(),
                Compression::Gzip,
            ),
        ],
        &["/bin/sh"],
    );
    let two = TestImage::new(vec![shared_base], &["/bin/true"]);
    let dir_one = tmp.path().join("one");
    one.write_layout(&dir_one, Some("v1"));
    let archive = tmp.path().join("one-again.tar");
    tar_layout(&dir_one, &archive);
    let dir_two = tmp.path().join("two");
    two.write_layout(&dir_two, None);

    let (image_one, _) = store
        .ensure(dir_one.to_str().unwrap(), &opts())
        .await
        .unwrap();
    let (_, _) = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap();
    let (image_two, _) = store
        .ensure(dir_two.to_str().unwrap(), &opts())
        .await
        .unwrap();
    let names = store.get(&image_one.id).unwrap().unwrap().names;
    assert_eq!(names, vec!["one:v1".to_string(), "one-again:v1".into()]);
    let disk = store.rootfs_disk(&image_one).unwrap().path;

    // What a killed import would leave behind: swept by the next removal.
    let leftover = store.root().join("tmp/blob-leftover");
    std::fs::write(&leftover, b"half a blob").unwrap();
    std::fs::create_dir_all(store.root().join("tmp/unpack-leftover/rootfs/etc")).unwrap();
    store.remove("one:v1").unwrap();
    assert!(walk(&store.root().join("tmp")).is_empty());
    assert!(store.get("one:v1").unwrap().is_none());
    assert_eq!(store.get("one-again:v1").unwrap().unwrap().id, image_one.id);
    assert!(disk.exists(), "a name is left: the disk stays");

    store.remove("one-again:v1").unwrap();
    assert!(store.get(&image_one.id).unwrap().is_none());
    assert!(!disk.exists(), "the disk goes with the last name");
    let blobs: Vec<String> = std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    let mut expected = vec![two.id(), sha256(&two.config), two.layers[0].digest.clone()];
    expected.sort();
    let mut blobs_sorted = blobs.clone();
    blobs_sorted.sort();
    assert_eq!(
        blobs_sorted, expected,
        "only the other image's blobs (the shared base layer too) stay"
    );
    assert!(matches!(store.remove("one:v1"), Err(Error::NotFound(_))));

    // By id: the whole image.
    store.remove(&image_two.id[7..20]).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn ext4_from_dir_fits_many_files_and_checks_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("many")).unwrap();
    for i in 0..5000 {
        std::fs::write(
            tree.join("many")
                .join(format!("file-with-a-longish-name-{i:05}")),
            b"",
        )
        .unwrap();
    }
    std::fs::write(tree.join("big"), vec![0x5a; 24 << 20]).unwrap();
    std::os::unix::fs::symlink("big", tree.join("link")).unwrap();
    let out = tmp.path().join("tree.ext4");
    image::disk::ext4_from_dir(&tree, &out).unwrap();
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert!(stat(&out, "/many/file-with-a-longish-name-04999").is_some());
    assert_eq!(stat(&out, "/big").unwrap().size, 24 << 20);
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(
        size < 64 << 20,
        "sized to the content, not a fixed large size: {size}"
    );
    // Building again over an existing file replaces it.
    image::disk::ext4_from_dir(&tree, &out).unwrap();

    let err =
        image::disk::ext4_from_dir(&tree.join("big"), &tmp.path().join("x.ext4")).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn ext4_in_place_keeps_a_slot_sparse_and_writable_disks_get_room_and_a_journal() {
    use image::disk::{ext4_with, Ext4Options};
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello"), b"hello").unwrap();

    // A 1 GiB sparse slot: the filesystem goes in at the start, the slot keeps its length
    // and stays (nearly) unallocated.
    let slot = tmp.path().join("slot");
    std::fs::File::create(&slot)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let opts = Ext4Options {
        in_place: true,
        ..Default::default()
    };
    let fs_size = ext4_with(&tree, &slot, &opts).unwrap();
    let md = std::fs::metadata(&slot).unwrap();
    assert_eq!(md.len(), 1 << 30, "the slot keeps its length");
    assert!(
        fs_size < 64 << 20 && md.blocks() * 512 <= fs_size,
        "{fs_size} {}",
        md.blocks()
    );
    assert_eq!(stat(&slot, "/hello").unwrap().size, 5);

    // Too small a limit: refused, naming the sizes.
    let err = ext4_with(
        &tree,
        &slot,
        &Ext4Options {
            in_place: true,
            max_bytes: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most 1 MiB"), "{err}");

    // A writable disk: a journal and at least the free room asked for.
    let rw = tmp.path().join("rw.ext4");
    ext4_with(
        &tree,
        &rw,
        &Ext4Options {
            free_bytes: 256 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&rw)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("has_journal"), "{text}");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert!(
        field("Free blocks:") * field("Block size:") >= 256 << 20,
        "{text}"
    );
}

#[tokio::test]
async fn local_names_are_used_without_a_registry_and_removed_one_at_a_time() {
    let (tmp, store) = store();
    let img = TestImage::new(
        vec![compress(&busybox_layer().finish(), Compression::None)],
        &["/bin/sh"],
    );
    let layout = tmp.path().join("local");
    img.write_layout(&layout, None);
    let archive = tmp.path().join("local-copy.tar");
    tar_layout(&layout, &archive);
    let quiet = PullOptions {
        progress: true, // not a terminal here: drawn nowhere, but the path runs
        ..PullOptions::default()
    };
    store
        .ensure(layout.to_str().unwrap(), &quiet)
        .await
        .unwrap();
    store
        .ensure(archive.to_str().unwrap(), &quiet)
        .await
        .unwrap();

    // No registry is reachable as `docker.io/library/local`: these come from the store.
    let (by_short, fetched) = store.ensure("local", &opts()).await.unwrap();
    assert_eq!(
        (by_short.id.as_str(), fetched),
        (img.id().as_str(), Fetched::default())
    );
    let (by_id, _) = store.ensure(&img.id()[7..15], &opts()).await.unwrap();
    assert_eq!(by_id.id, img.id());

    // `local` is `local:latest`: only that name goes.
    store.remove("local").unwrap();
    assert_eq!(
        store.get(&img.id()).unwrap().unwrap().names,
        vec!["local-copy:latest".to_string()]
    );
    let disk = store
        .clone()
        .with_progress(true)
        .rootfs_disk(&by_id)
        .unwrap();
    assert!(disk.built);
    assert!(
        matches!(store.get("abc"), Ok(None)),
        "under 4 hex digits is no id prefix"
    );
}

#[tokio::test]
async fn docker_archive_with_compressed_layers() {
    let (tmp, store) = store();
    let top = Layer::new()
        .file("top", b"zstd layer", 0o644, 0, 0)
        .finish();
    let img = TestImage::new(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            compress(&top, Compression::Zstd),
        ],
        &["/bin/sh"],
    );
    let archive = tmp.path().join("compressed.tar");
    img.write_docker_archive(&archive, &["compressed:1"]);
    let (image, fetched) = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(fetched.blobs_imported, 4);
    for layer in &img.layers {
        assert!(store
            .root()
            .join("blobs/sha256")
            .join(&layer.digest[7..])
            .is_file());
    }
    let (_, fetched) = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap();
    assert_eq!(fetched, Fetched::default());
    let disk = store.rootfs_disk(&image).unwrap().path;
    assert_eq!(cat(&disk, "/top"), "zstd layer");

    // A compressed layer that does not decompress to its diff id.
    let mut lying = TestImage::new(vec![compress(&top, Compression::Gzip)], &["/bin/sh"]);
    let other = compress(
        &Layer::new().file("other", b"other", 0o644, 0, 0).finish(),
        Compression::Gzip,
    );
    lying.layers[0].bytes = other.bytes;
    let diff_id = lying.layers[0].diff_id.clone();
    let archive = tmp.path().join("lying.tar");
    lying.write_docker_archive(&archive, &["lying:1"]);
    let err = store
        .ensure(archive.to_str().unwrap(), &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err:?}");
    assert!(err.to_string().contains(&diff_id), "{err}");
    assert!(
        !store
            .root()
            .join("blobs/sha256")
            .join(&other.digest[7..])
            .exists(),
        "not kept"
    );
}
