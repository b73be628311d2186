//! virtio-blk unit tests: real requests in real guest memory against a temporary image.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::bit;
use super::request::{advance, ID_BYTES, SEG_MAX};
use super::{Block, BlockError};
use crate::devices::virtio::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING};
use tempfile::NamedTempFile;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;

const MEM_SIZE: usize = 0x40000;
const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const SECTORS: u64 = 4;

/// The image content: byte `i` is `i % 251`, so every sector differs.
fn contents() -> Vec<u8> {
    (0..SECTORS * 512).map(|i| (i % 251) as u8).collect()
}

fn image() -> NamedTempFile {
    let mut f = NamedTempFile::new().unwrap();
    f.write_all(&contents()).unwrap();
    f
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

/// Writes a request header at `HEADER` (and poisons the status byte); returns its descriptor.
fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) -> RawDescriptor {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    readable(HEADER, 16)
}

fn status() -> RawDescriptor {
    writable(STATUS, 1)
}

/// Runs one chain through a freshly activated device; returns (status byte, used len).
fn submit(block: &mut Block, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32) {
    let vq = MockSplitQueue::new(mem, 256);
    vq.build_desc_chain(descs).unwrap();
    let irq = Arc::new(IrqTrigger::new().unwrap());
    block
        .activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();
    assert_eq!(vq.used().idx().load(), 1, "the chain was not returned");
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0, "no interrupt");
    let len = vq.used().ring().ref_at(0).unwrap().load().len();
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

fn status_of(
    read_only: bool,
    descs: impl FnOnce(&GuestMemoryMmap) -> Vec<RawDescriptor>,
) -> (u8, u32) {
    let img = image();
    let mem = mem();
    let mut block = Block::new(img.path(), read_only).unwrap();
    let descs = descs(&mem);
    submit(&mut block, &mem, &descs)
}

/// Builds a request in guest memory and returns its descriptors.
type Chain = fn(&GuestMemoryMmap) -> Vec<RawDescriptor>;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn read_returns_file_contents() {
    let img = image();
    let mem = mem();
    let mut block = Block::new(img.path(), true).unwrap();
    // With every feature acked, so the event-index path is the one exercised.
    block.core.set_acked_features(block.core.avail_features());
    let descs = [
        header(&mem, VIRTIO_BLK_T_IN, 1),
        writable(DATA, 512),
        writable(DATA + 0x1000, 1024),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (OK, 1536 + 1));
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got[..512], GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut got[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, contents()[512..2048]);
}

#[test]
fn write_lands_in_file() {
    let img = image();
    let mem = mem();
    let mut block = Block::new(img.path(), false).unwrap();
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    let descs = [
        header(&mem, VIRTIO_BLK_T_OUT, 2),
        readable(DATA, 512),
        readable(DATA + 0x1000, 512),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (OK, 1));
    let mut want = contents();
    want[1024..1536].fill(0xab);
    want[1536..].fill(0xcd);
    assert_eq!(std::fs::read(img.path()).unwrap(), want);
}

#[test]
fn write_to_read_only_disk_is_ioerr() {
    let img = image();
    let mem = mem();
    let mut block = Block::new(img.path(), true).unwrap();
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let descs = [
        header(&mem, VIRTIO_BLK_T_OUT, 0),
        readable(DATA, 512),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (IOERR, 1));
    assert_eq!(std::fs::read(img.path()).unwrap(), contents());
}

#[test]
fn flush_is_ok() {
    let got = status_of(false, |mem| {
        vec![header(mem, VIRTIO_BLK_T_FLUSH, 0), status()]
    });
    assert_eq!(got, (OK, 1));
}

#[test]
fn get_id_returns_dev_and_inode() {
    let img = image();
    let mem = mem();
    let meta = std::fs::metadata(img.path()).unwrap();
    let mut want = format!("{:x}-{:x}", meta.dev(), meta.ino()).into_bytes();
    want.resize(ID_BYTES, 0);
    let mut block = Block::new(img.path(), false).unwrap();
    let descs = [
        header(&mem, VIRTIO_BLK_T_GET_ID, 0),
        writable(DATA, 20),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (OK, 21));
    let mut got = [0u8; ID_BYTES];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got[..], want[..]);
}

#[test]
fn out_of_range_sectors_are_ioerr() {
    for (sector, len) in [
        (SECTORS, 512),
        (SECTORS - 1, 1024),
        (u64::MAX / 512 + 1, 512),
    ] {
        let got = status_of(false, |mem| {
            vec![
                header(mem, VIRTIO_BLK_T_IN, sector),
                writable(DATA, len),
                status(),
            ]
        });
        assert_eq!(got, (IOERR, 1), "sector {sector}, {len} bytes");
    }
}

#[test]
fn unsupported_type_is_unsupp() {
    let got = status_of(false, |mem| vec![header(mem, 11, 0), status()]);
    assert_eq!(got, (VIRTIO_BLK_S_UNSUPP as u8, 1));
}

#[test]
fn malformed_requests_are_ioerr() {
    let cases: [(&str, Chain); 5] = [
        ("short header", |mem| {
            header(mem, VIRTIO_BLK_T_FLUSH, 0);
            vec![readable(HEADER, 8), status()]
        }),
        ("read into a device-readable buffer", |mem| {
            vec![
                header(mem, VIRTIO_BLK_T_IN, 0),
                readable(DATA, 512),
                status(),
            ]
        }),
        ("write from a device-writable buffer", |mem| {
            vec![
                header(mem, VIRTIO_BLK_T_OUT, 0),
                writable(DATA, 512),
                status(),
            ]
        }),
        ("buffer outside guest memory", |mem| {
            vec![
                header(mem, VIRTIO_BLK_T_IN, 0),
                writable(MEM_SIZE as u64 - 256, 512),
                status(),
            ]
        }),
        ("more segments than seg_max", |mem| {
            // 1 KiB in SEG_MAX + 1 pieces: valid in every other respect.
            let mut descs = vec![header(mem, VIRTIO_BLK_T_IN, 0), writable(DATA, 512)];
            descs.extend((0..SEG_MAX).map(|i| writable(DATA + 512 + 4 * i as u64, 4)));
            descs.push(status());
            descs
        }),
    ];
    for (what, descs) in cases {
        assert_eq!(status_of(false, descs), (IOERR, 1), "{what}");
    }
}

#[test]
fn seg_max_segments_are_served() {
    let got = status_of(false, |mem| {
        let mut descs = vec![header(mem, VIRTIO_BLK_T_IN, 0)];
        descs.extend((0..SEG_MAX).map(|i| writable(DATA + 16 * i as u64, 16)));
        descs.push(status());
        descs
    });
    assert_eq!(got, (OK, 2048 + 1));
}

#[test]
fn read_across_memory_regions() {
    let img = image();
    let half = MEM_SIZE / 2;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)])
            .unwrap();
    let mut block = Block::new(img.path(), true).unwrap();
    let buf = half as u64 - 100;
    let descs = [
        header(&mem, VIRTIO_BLK_T_IN, 0),
        writable(buf, 512),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (OK, 513));
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
    assert_eq!(got[..], contents()[..512]);
}

#[test]
fn advance_drops_transferred_bytes() {
    let mut buf = [0u8; 48];
    let base = buf.as_mut_ptr();
    let iov = |off: usize, len| libc::iovec {
        iov_base: base.wrapping_add(off).cast(),
        iov_len: len,
    };
    let mut iovs = [iov(0, 16), iov(16, 16), iov(32, 16)];
    let rest = advance(&mut iovs, 20);
    assert_eq!(rest.len(), 2);
    assert_eq!(
        (rest[0].iov_base, rest[0].iov_len),
        (iov(20, 12).iov_base, 12)
    );
    assert!(advance(rest, 28).is_empty());
}

#[test]
fn chains_without_status_byte_are_returned_empty() {
    let cases: [(&str, Chain); 3] = [
        ("header only", |mem| {
            vec![header(mem, VIRTIO_BLK_T_FLUSH, 0)]
        }),
        ("read-only status", |mem| {
            vec![header(mem, VIRTIO_BLK_T_FLUSH, 0), readable(STATUS, 1)]
        }),
        ("status outside guest memory", |mem| {
            vec![
                header(mem, VIRTIO_BLK_T_FLUSH, 0),
                writable(MEM_SIZE as u64, 1),
            ]
        }),
    ];
    for (what, descs) in cases {
        assert_eq!(status_of(false, descs), (0xff, 0), "{what}");
    }
}

#[test]
fn config_space_holds_capacity_and_seg_max() {
    let img = image();
    let block = Block::new(img.path(), false).unwrap();
    let read = |offset, len| {
        let mut buf = vec![0u8; len];
        block.read_config(offset, &mut buf);
        buf
    };
    assert_eq!(read(0, 8), SECTORS.to_le_bytes());
    let halves = [read(0, 4), read(4, 4)].concat();
    assert_eq!(halves, SECTORS.to_le_bytes());
    assert_eq!(read(12, 4), (SEG_MAX as u32).to_le_bytes());
    assert_eq!(read(14, 4), [0, 0, 0, 0]);
    assert_eq!(read(0x40, 4), [0; 4]);
    assert_eq!(read(u64::MAX, 1), [0]);
}

#[test]
fn read_only_feature_only_when_read_only() {
    let img = image();
    let ro = Block::new(img.path(), true).unwrap().core.avail_features();
    let rw = Block::new(img.path(), false).unwrap().core.avail_features();
    assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro & !bit(VIRTIO_BLK_F_RO), rw);
    assert_ne!(rw & VIRTIO_F_VERSION_1, 0);
}

#[test]
fn new_rejects_unusable_images() {
    let empty = NamedTempFile::new().unwrap();
    assert!(matches!(
        Block::new(empty.path(), false),
        Err(BlockError::Empty { .. })
    ));
    let mut odd = NamedTempFile::new().unwrap();
    odd.write_all(&[0; 700]).unwrap();
    let err = Block::new(odd.path(), false).err().unwrap();
    assert!(matches!(err, BlockError::PartialSector { size: 700, .. }));
    assert!(err.to_string().contains(&odd.path().display().to_string()));
    let missing = Block::new(Path::new("/nonexistent/disk.img"), true);
    assert!(matches!(missing, Err(BlockError::Open { .. })));
}
