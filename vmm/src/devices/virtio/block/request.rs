//! One virtio-blk request: its descriptor chain sorted by role, then executed against the disk
//! image.
//!
//! A request is first sorted, in one pass over its descriptor chain, into fixed-size arrays on the
//! stack (header, data, status), then executed. The status byte is the last byte of the last
//! descriptor, wherever the driver put it (5.2.6: it is the final field of the request). A guest
//! mistake becomes `VIRTIO_BLK_S_IOERR` when the chain has a usable status byte, and a used length
//! of 0 when it has none; the VMM itself never fails on guest input.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::io_limiter::IoCost;

pub(super) const SECTOR_SIZE: u64 = 512;
/// Data descriptors per request (advertised as `seg_max`), and so the size of the on-stack iovec
/// array that lets a request be one syscall.
pub(super) const SEG_MAX: usize = 128;
pub(super) const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
const HEADER_SIZE: usize = 16;

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

/// The backing image, apart from the queue state so requests can borrow it while the queue is
/// borrowed mutably.
pub(super) struct Disk {
    pub(super) file: File,
    pub(super) read_only: bool,
    /// In bytes, a whole number of sectors.
    pub(super) size: u64,
    pub(super) id: [u8; ID_BYTES],
}

impl Disk {
    /// Serves one request if `admit` accepts its cost; returns the used length (bytes written
    /// into guest buffers), or `None` when `admit` refused it (nothing was done).
    pub(super) fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = Descriptor>,
        admit: impl FnOnce(IoCost) -> bool,
    ) -> Option<u32> {
        let Some(req) = Request::parse(chain) else {
            guest_warn!("virtio-blk: empty descriptor chain");
            return Some(0);
        };
        if !admit(req.cost(mem)) {
            return None;
        }
        Some(self.execute_request(mem, &req))
    }

    fn execute_request(&self, mem: &GuestMemoryMmap, req: &Request) -> u32 {
        let Some(status_addr) = req.status_addr(mem) else {
            guest_warn!("virtio-blk: request without a device-writable status byte; dropped");
            return 0;
        };
        let (status, written) = match self.execute(mem, req) {
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
pub(super) fn advance(iovs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
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

    /// What the request costs a rate limiter: one operation, and the data bytes of a read or a
    /// write. Malformed requests cost their operation too (they are work for the host).
    fn cost(&self, mem: &GuestMemoryMmap) -> IoCost {
        let bytes = match self.header(mem) {
            Ok((VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT, _)) => self
                .data
                .iter()
                .take(self.segments)
                .map(|d| u64::from(d.len()))
                .sum(),
            _ => 0,
        };
        IoCost { bytes, ops: 1 }
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
