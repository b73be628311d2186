//! The ext4 disks the store builds: many files from a directory, checked clean by e2fsck; a
//! slot image kept sparse; writable disks with room and a journal.

mod common;

use common::*;

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
