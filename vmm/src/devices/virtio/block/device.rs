//! State of the virtio-blk device and its request processing.
//!
//! A request is first sorted, in one pass over its descriptor chain, into fixed-size arrays on the
//! stack (header, data, status), then executed. The status byte is the last byte of the last
//! descriptor, wherever the driver put it (5.2.6: it is the final field of the request). A guest
//! mistake becomes `VIRTIO_BLK_S_IOERR` when the chain has a usable status byte, and a used length
//! of 0 when it has none; the VMM itself never fails on guest input.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::error;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::{
    device_type, read_config_space, take_queues, ActivateError, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};

const QUEUE_SIZES: &[u16] = &[256];
const SECTOR_SIZE: u64 = 512;
/// Data descriptors per request (advertised as `seg_max`), and so the size of the on-stack iovec
/// array that lets a request be one syscall.
const SEG_MAX: usize = 128;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
const HEADER_SIZE: usize = 16;
/// `capacity`, `size_max` and `seg_max` of `struct virtio_blk_config`. The fields after them
/// belong to features we do not offer, so they read as zero like any offset past the end.
const CONFIG_SIZE: usize = 16;

/// Why a disk image cannot back a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot get the size of disk image {}: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error("disk image {} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("disk image {} is {size} bytes, not a whole number of 512-byte sectors", path.display())]
    PartialSector { path: PathBuf, size: u64 },
    #[error("cannot create the queue eventfd for disk image {}: {source}", path.display())]
    EventFd { path: PathBuf, source: io::Error },
}

/// Why one request failed: logged, and reported to the guest as its status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(
        "header is not a device-readable buffer of at least {} bytes",
        HEADER_SIZE
    )]
    BadHeader,
    #[error("{0} data segments, more than seg_max ({max})", max = SEG_MAX)]
    TooManySegments(usize),
    #[error("data buffer with the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("buffer {0:#x}+{1} is not in guest memory")]
    BadBuffer(u64, u32),
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("{1} bytes at sector {0} run past the end of the disk")]
    OutOfRange(u64, u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("host I/O error: {0}")]
    Io(#[from] io::Error),
}

/// What an activated device holds.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<IrqTrigger>,
}

/// The backing image, apart from the queue state so requests can borrow it while the queue is
/// borrowed mutably.
struct Disk {
    file: File,
    read_only: bool,
    /// In bytes, a whole number of sectors.
    size: u64,
    id: [u8; ID_BYTES],
}

pub struct Block {
    disk: Disk,
    pub(super) queue_evts: [EventFd; 1],
    acked_features: u64,
    active: Option<Active>,
}

impl Block {
    /// Opens the raw disk image at `path` (a regular file or a block device).
    ///
    /// The id the guest reads with `VIRTIO_BLK_T_GET_ID` (`/sys/block/vdX/serial` in Linux) is
    /// `<st_dev>-<st_ino>` of the image in lowercase hex, cut to 20 bytes: stable across VM
    /// restarts and renames, and different for different images on one host.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let path_buf = || path.to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path_buf(),
                source,
            })?;
        let size_err = |source| BlockError::Size {
            path: path_buf(),
            source,
        };
        // Seeking rather than `metadata().len()` also sizes block devices.
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = file.metadata().map_err(size_err)?;
        if size == 0 {
            return Err(BlockError::Empty { path: path_buf() });
        }
        if size & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::PartialSector {
                path: path_buf(),
                size,
            });
        }
        let mut id = [0u8; ID_BYTES];
        let name = format!("{:x}-{:x}", meta.dev(), meta.ino());
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| BlockError::EventFd {
            path: path_buf(),
            source,
        })?;
        Ok(Self {
            disk: Disk {
                file,
                read_only,
                size,
                id,
            },
            queue_evts: [queue_evt],
            acked_features: 0,
            active: None,
        })
    }

    /// Serves every available request and interrupts the guest if it asked for it.
    pub(super) fn process_queue(&mut self) {
        let disk = &self.disk;
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        loop {
            if let Err(e) = active.queue.disable_notification(mem) {
                error!("virtio-blk: cannot disable notifications: {e}");
                break;
            }
            let mut popped = false;
            while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                let len = disk.serve(mem, chain);
                match active.queue.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => guest_warn!("virtio-blk: cannot return descriptor {head}: {e}"),
                }
            }
            match active.queue.enable_notification(mem) {
                Ok(true) if popped => {}
                // Chains announced but none could be popped: a corrupt available ring, which
                // would otherwise keep this loop spinning.
                Ok(true) => {
                    guest_warn!("virtio-blk: available ring index is corrupt");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-blk: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        if used_any && active.queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = active.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("virtio-blk: cannot interrupt the guest: {e}");
            }
        }
    }
}

impl Disk {
    /// Serves one request; returns the used length (bytes written into guest buffers).
    fn serve(&self, mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> u32 {
        let Some(req) = Request::parse(chain) else {
            guest_warn!("virtio-blk: empty descriptor chain");
            return 0;
        };
        let Some(status_addr) = req.status_addr(mem) else {
            guest_warn!("virtio-blk: request without a device-writable status byte; dropped");
            return 0;
        };
        let (status, written) = match self.execute(mem, &req) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                guest_warn!("virtio-blk: request failed: {e}");
                match e {
                    RequestError::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP, 0),
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
        };
        if let Err(e) = mem.write_obj(status as u8, status_addr) {
            guest_warn!("virtio-blk: cannot write status: {e}");
            return written;
        }
        written.saturating_add(1)
    }

    /// Returns the bytes of data written into guest memory.
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> Result<u32, RequestError> {
        let (kind, sector) = req.header(mem)?;
        let data = req.data()?;
        let direction_ok = |writable: bool| {
            if data.iter().all(|d| d.is_write_only() == writable) {
                Ok(())
            } else {
                Err(RequestError::WrongDirection(kind))
            }
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                direction_ok(true)?;
                self.transfer(mem, data, sector, false)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                direction_ok(false)?;
                self.transfer(mem, data, sector, true)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.file.sync_data()?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                direction_ok(true)?;
                self.write_id(mem, data)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Moves the data between the image and guest memory with one `preadv`/`pwritev` (more only
    /// after a short transfer).
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        sector: u64,
        write: bool,
    ) -> Result<u32, RequestError> {
        let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(RequestError::PartialSector(len));
        }
        let start = sector.checked_mul(SECTOR_SIZE);
        if start
            .and_then(|s| s.checked_add(len))
            .is_none_or(|end| end > self.size)
        {
            return Err(RequestError::OutOfRange(sector, len));
        }
        let mut offset = start.unwrap_or_default();

        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iovs = [empty; SEG_MAX];
        let mut count = 0;
        for desc in data {
            for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                let slice =
                    slice.map_err(|_| RequestError::BadBuffer(desc.addr().0, desc.len()))?;
                // Only a buffer spanning two memory regions needs more than one entry. The
                // pointer guards are plain pointers (vm-memory's `xen` feature is off), so the
                // pointers outlive them. Pages are marked dirty before the read: marking too
                // much on failure is harmless, too little is not.
                let iov = iovs
                    .get_mut(count)
                    .ok_or(RequestError::TooManySegments(count + 1))?;
                iov.iov_base = if write {
                    slice.ptr_guard().as_ptr().cast_mut().cast()
                } else {
                    slice.bitmap().mark_dirty(0, slice.len());
                    slice.ptr_guard_mut().as_ptr().cast()
                };
                iov.iov_len = slice.len();
                count += 1;
            }
        }

        let mut pending = &mut iovs[..count];
        while !pending.is_empty() {
            let n = rw_vectored(self.file.as_raw_fd(), pending, offset, write)?;
            offset += n as u64;
            pending = advance(pending, n);
        }
        // The whole chain is at most 4 GiB (virtio-queue stops iterating past that).
        Ok(if write { 0 } else { len as u32 })
    }

    fn write_id(&self, mem: &GuestMemoryMmap, data: &[Descriptor]) -> Result<u32, RequestError> {
        let mut rest = &self.id[..];
        for desc in data {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at(rest.len().min(desc.len() as usize));
            mem.write_slice(now, desc.addr())
                .map_err(|_| RequestError::BadBuffer(desc.addr().0, desc.len()))?;
            rest = later;
        }
        Ok((ID_BYTES - rest.len()) as u32)
    }
}

/// One `preadv`/`pwritev` at `offset`, retried on `EINTR`. Transferring nothing is an error (the
/// image shrank under us, or the host disk is full), so callers always make progress.
fn rw_vectored(fd: RawFd, iovs: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let count = iovs.len() as libc::c_int; // at most SEG_MAX
    loop {
        // SAFETY: each iovec is a bounds-checked slice of guest memory, which stays mapped while
        // the device holds `mem`; the kernel touches at most `iov_len` bytes at each, and reads
        // `iovs` only during the call.
        let n = unsafe {
            if write {
                libc::pwritev(fd, iovs.as_ptr(), count, offset)
            } else {
                libc::preadv(fd, iovs.as_ptr(), count, offset)
            }
        };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no progress")),
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Drops the first `n` transferred bytes from `iovs`.
fn advance(iovs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let done = iovs
        .iter()
        .take_while(|iov| {
            let whole = iov.iov_len <= n;
            if whole {
                n -= iov.iov_len;
            }
            whole
        })
        .count();
    let rest = &mut iovs[done..];
    if let Some(first) = rest.first_mut() {
        first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
        first.iov_len -= n;
    }
    rest
}

/// A request's descriptors sorted by role.
struct Request {
    header: Descriptor,
    /// The first `SEG_MAX` data descriptors; `segments` counts them all.
    data: [Descriptor; SEG_MAX],
    segments: usize,
    status: Option<Descriptor>,
}

impl Request {
    /// `None` for an empty chain. The chain is finite: virtio-queue bounds it by the queue or
    /// indirect table size.
    fn parse(mut chain: impl Iterator<Item = Descriptor>) -> Option<Self> {
        let header = chain.next()?;
        let mut req = Self {
            header,
            data: [Descriptor::default(); SEG_MAX],
            segments: 0,
            status: None,
        };
        // The last descriptor is the status; every one between it and the header is data.
        for desc in chain {
            if let Some(data) = req.status.replace(desc) {
                if let Some(slot) = req.data.get_mut(req.segments) {
                    *slot = data;
                }
                req.segments += 1;
            }
        }
        Some(req)
    }

    /// The address of the status byte: the last byte of a device-writable last descriptor.
    fn status_addr(&self, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
        let desc = self.status.filter(|d| d.is_write_only() && d.len() > 0)?;
        let addr = desc.addr().0.checked_add(u64::from(desc.len()) - 1)?;
        Some(GuestAddress(addr)).filter(|&a| mem.address_in_range(a))
    }

    /// The request type and sector.
    fn header(&self, mem: &GuestMemoryMmap) -> Result<(u32, u64), RequestError> {
        let h = self.header;
        if h.is_write_only() || (h.len() as usize) < HEADER_SIZE {
            return Err(RequestError::BadHeader);
        }
        let mut bytes = [0u8; HEADER_SIZE];
        mem.read_slice(&mut bytes, h.addr())
            .map_err(|_| RequestError::BadBuffer(h.addr().0, h.len()))?;
        let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = bytes;
        Ok((
            u32::from_le_bytes([t0, t1, t2, t3]),
            u64::from_le_bytes(sector),
        ))
    }

    fn data(&self) -> Result<&[Descriptor], RequestError> {
        self.data
            .get(..self.segments)
            .ok_or(RequestError::TooManySegments(self.segments))
    }
}

const fn bit(n: u32) -> u64 {
    1 << n
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.disk.read_only {
            bit(VIRTIO_BLK_F_RO)
        } else {
            0
        };
        VIRTIO_F_VERSION_1
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..8].copy_from_slice(&(self.disk.size / SECTOR_SIZE).to_le_bytes());
        config[12..].copy_from_slice(&(SEG_MAX as u32).to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("virtio-blk: config write at {offset:#x} ignored (read-only config space)");
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        let [mut queue] = take_queues::<1>(&mem, queues)?;
        queue.set_event_idx(self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some(Active { mem, queue, irq });
        // Requests may have been queued before DRIVER_OK.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
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
        block.set_acked_features(block.avail_features());
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
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), half),
            (GuestAddress(half as u64), half),
        ])
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
        let ro = Block::new(img.path(), true).unwrap().avail_features();
        let rw = Block::new(img.path(), false).unwrap().avail_features();
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
}
