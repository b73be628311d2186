//! OCI layer unpack of arbitrary tar bytes (as an image's layer after decompression) into a
//! fresh directory, beside a sibling directory the layer must never reach: whatever the entries
//! (`..`, absolute paths, symlinks and hard links pointing out, whiteouts, devices), nothing
//! outside the target directory is created, changed or removed.
#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use image::UnpackLimits;
use libfuzzer_sys::fuzz_target;
use microvm_fuzz::tree::tree_state;

const SENTINEL: &[u8] = b"must stay as it is\n";

struct Base {
    dir: tempfile::TempDir,
    outside: PathBuf,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        // On tmpfs where there is one: thousands of trees a second are made and removed.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("file"), SENTINEL).unwrap();
        Base { dir, outside }
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let before = tree_state(base.dir.path(), None);
    let root = base.dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let limits = UnpackLimits {
        max_entries: 256,
        max_total_bytes: 1 << 20,
        max_entry_bytes: 1 << 20,
        max_header_bytes: 64 << 10,
    };
    let _ = image::fuzzing::apply_layer(&root, data, &limits);
    // Fuzzing runs as root, so directories a layer left without write permission go too;
    // what is left must be exactly what was there before.
    fs::remove_dir_all(&root).expect("remove the unpacked tree");
    assert_eq!(
        fs::read(base.outside.join("file")).unwrap(),
        SENTINEL,
        "the layer changed a file outside its root"
    );
    assert_eq!(
        tree_state(base.dir.path(), None),
        before,
        "the layer wrote outside its root"
    );
});
