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
