//! virtio-blk against a real disk image file: the guest's request chains (header, data,
//! status in any shape) through the device's queue processing. The image never changes size.
#![no_main]

use std::fs::File;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use microvm_fuzz::{drive, DeviceInput, Input};
use vmm::devices::virtio::block::Block;

const DISK_BYTES: u64 = 64 * 1024;

fn disk() -> &'static (tempfile::TempDir, PathBuf) {
    static DISK: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk.img");
        File::create(&path)
            .and_then(|f| f.set_len(DISK_BYTES))
            .expect("disk image");
        (dir, path)
    })
}

// `read_only:u8` then a `DeviceInput`.
fuzz_target!(|data: &[u8]| {
    let mut r = Input(data);
    let read_only = r.u8() & 1 != 0;
    let input = DeviceInput::read(&mut r);
    let (_, path) = disk();
    let mut dev = Block::new(path, read_only).expect("open the disk image");
    let size = |_: &mut Block, _: &microvm_fuzz::Driver| {
        let len = std::fs::metadata(path).unwrap().len();
        assert_eq!(len, DISK_BYTES, "a guest request changed the image's size");
    };
    drive(&mut dev, &input, size);
});
