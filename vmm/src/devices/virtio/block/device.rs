//! State of the virtio-blk device and its request processing.
//!
//! The image is opened once; requests are parsed and executed in `request.rs`.

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use vmm_api::RateLimitConfig;

use super::request::{Disk, ID_BYTES, SECTOR_SIZE, SEG_MAX};
use super::throttle::Throttle;
use crate::devices::io_limiter::{IoLimiter, MonotonicClock};
use crate::devices::virtio::{
    device_type, read_config_space, ActivateError, DeviceCore, VirtioDevice, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZES: &[u16] = &[256];
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
    #[error("cannot create the rate limit timer: {0}")]
    Timer(#[source] io::Error),
}

/// What the device counts, for tests and for the VMM's report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// Times the rate limit stopped the queue until its timer.
    pub throttled: u64,
}

pub struct Block {
    pub(super) disk: Disk,
    pub(super) core: DeviceCore,
    /// `None`: unlimited.
    pub(super) throttle: Option<Throttle>,
    pub(super) stats: BlockStats,
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
        let ro = if read_only { bit(VIRTIO_BLK_F_RO) } else { 0 };
        let features = VIRTIO_F_VERSION_1
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | ro;
        let core = DeviceCore::new("virtio-blk", device_type::BLOCK, features, QUEUE_SIZES)
            .map_err(|source| BlockError::EventFd {
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
            core,
            throttle: None,
            stats: BlockStats::default(),
        })
    }

    /// Limits the guest's I/O as `limit` says (a limit without buckets changes nothing).
    pub fn with_rate_limit(self, limit: &RateLimitConfig) -> Result<Self, BlockError> {
        if !limit.is_limited() {
            return Ok(self);
        }
        self.with_limiter(IoLimiter::new(limit, Box::new(MonotonicClock)))
    }

    pub(super) fn with_limiter(mut self, limiter: IoLimiter) -> Result<Self, BlockError> {
        self.throttle = Some(Throttle::new(limiter).map_err(BlockError::Timer)?);
        Ok(self)
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Serves the available requests the rate limit allows and interrupts the guest if it asked
    /// for it. The first request over the limit stays on the ring until the limiter's timer.
    pub(super) fn process_queue(&mut self) {
        let (disk, throttle, stats) = (&self.disk, &mut self.throttle, &mut self.stats);
        let Some(throttle) = throttle else {
            self.core
                .serve_queue_or_defer(0, |mem, chain| disk.serve(mem, chain, |_| true));
            return;
        };
        if throttle.is_waiting() {
            return;
        }
        self.core.serve_queue_or_defer(0, |mem, chain| {
            disk.serve(mem, chain, |cost| match throttle.admit(cost) {
                Ok(()) => true,
                Err(wait) => {
                    stats.throttled += 1;
                    // Its own target, so an operator can watch throttling without every
                    // other info line (`RUST_LOG=warn,disk_rate=info`).
                    guest_info!(
                        target: "disk_rate",
                        "virtio-blk: rate limit reached, queue paused for {wait:?} \
                         ({} pauses so far)",
                        stats.throttled
                    );
                    false
                }
            })
        });
    }
}

pub(super) const fn bit(n: u32) -> u64 {
    1 << n
}

impl VirtioDevice for Block {
    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..8].copy_from_slice(&(self.disk.size / SECTOR_SIZE).to_le_bytes());
        config[12..].copy_from_slice(&(SEG_MAX as u32).to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn activated(&mut self) -> Result<(), ActivateError> {
        // Requests may have been queued before DRIVER_OK.
        self.process_queue();
        Ok(())
    }

    fn resetting(&mut self) {
        if let Some(throttle) = &mut self.throttle {
            throttle.reset();
        }
    }
}
