//! State of the virtio-net device: the tap, the guest's MAC and MTU, a reusable RX frame buffer,
//! and the RX/TX processing the event handler calls.

use std::io;
use std::ops::ControlFlow;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{NetError, MAX_DESCRIPTORS, MAX_FRAME};
use crate::devices::virtio::{
    device_type, read_config_space, ActivateError, DeviceCore, VirtioDevice, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZES: &[u16] = &[256, 256];
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;

/// `mac[6]`, `status`, `max_virtqueue_pairs`, `mtu` of `struct virtio_net_config`.
const CONFIG_SIZE: usize = 12;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Guest offload features and the tap offload each needs the kernel to accept.
const GUEST_OFFLOADS: [(u32, u32); 4] = [
    (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
];

/// What the device counts, for tests and diagnostics. Every drop is also logged, rate-limited.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Host frames that did not fit the guest's buffer chain, or a chain that was not usable.
    pub rx_dropped: u64,
    /// Guest frames refused: malformed chain, too large, or rejected by the tap.
    pub tx_dropped: u64,
}

/// A frame buffer allocated once per direction: no allocation per packet.
pub(super) struct FrameBuf {
    buf: Box<[u8]>,
    /// Bytes of the frame held (0: none).
    len: usize,
}

impl FrameBuf {
    fn new() -> Self {
        Self {
            buf: vec![0; MAX_FRAME].into_boxed_slice(),
            len: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        self.len
    }
}

/// A virtio-net device backed by a tap.
pub struct Net {
    pub(super) core: DeviceCore,
    pub(super) tap: Tap,
    mac: [u8; 6],
    mtu: u16,
    /// A frame read from the tap that waits for an RX buffer.
    pub(super) rx: FrameBuf,
    /// Where a guest frame is gathered before it goes to the tap.
    pub(super) stats: NetStats,
}

impl Net {
    /// A device on the tap `tap_name` (created if it does not exist), for a guest with address
    /// `mac` and MTU `mtu`. The tap's own MTU is set to `mtu` as well.
    pub fn new(tap_name: &str, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        Self::check(mac, mtu)?;
        let tap = Tap::open(tap_name)?;
        tap.set_mtu(mtu)?;
        Self::with_tap(tap, mac, mtu)
    }

    /// A device on an open tap (see [`Tap::from_fd`]), whose MTU its owner set.
    pub fn with_tap(tap: Tap, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        Self::check(mac, mtu)?;
        let offloads = tap.supported_offloads();
        let mut features = VIRTIO_F_VERSION_1
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_STATUS);
        if offloads & libc::TUN_F_CSUM != 0 {
            // The guest may send partial checksums and TSO super-frames: the tap takes them
            // whenever it takes a virtio header at all; UFO only where the kernel knows UFO.
            features |=
                bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
            if offloads & libc::TUN_F_UFO != 0 {
                features |= bit(VIRTIO_NET_F_HOST_UFO);
            }
        }
        for (feature, tun) in GUEST_OFFLOADS {
            if offloads & tun != 0 {
                features |= bit(feature);
            }
        }
        let core = DeviceCore::new("virtio-net", device_type::NET, features, QUEUE_SIZES)
            .map_err(NetError::EventFd)?;
        Ok(Self {
            core,
            tap,
            mac,
            mtu,
            rx: FrameBuf::new(),
            stats: NetStats::default(),
        })
    }

    fn check(mac: [u8; 6], mtu: u16) -> Result<(), NetError> {
        // Any u16 MTU fits MAX_FRAME; below 68 IPv4 does not work (RFC 791).
        if mtu < 68 {
            return Err(NetError::Mtu(mtu));
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::Mac(mac));
        }
        Ok(())
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Moves frames from the tap to the guest while both have some: called when the tap is
    /// readable, when the guest adds RX buffers, and after activation. The tap is edge-triggered,
    /// so this reads until the tap is empty, or keeps the one frame that found no buffer until
    /// the guest adds buffers: a guest that never does holds one frame here, and the rest queue
    /// (and are dropped) in the kernel's tap queue, which is bounded.
    pub(super) fn process_rx(&mut self) {
        if !self.core.is_activated() {
            return;
        }
        let (rx, tap, stats) = (&mut self.rx, &self.tap, &mut self.stats);
        if rx.len == 0 && !read_tap(tap, rx) {
            return;
        }
        self.core.serve_queue(RXQ, |mem, chain| {
            let len = match write_frame(mem, chain, &mut rx.buf[..rx.len]) {
                Ok(len) => {
                    stats.rx_frames += 1;
                    len
                }
                Err(why) => {
                    stats.rx_dropped += 1;
                    guest_warn!("virtio-net: host frame of {} bytes dropped: {why}", rx.len);
                    0
                }
            };
            rx.len = 0;
            if read_tap(tap, rx) {
                ControlFlow::Continue(len)
            } else {
                ControlFlow::Break(len)
            }
        });
    }

    /// Sends the guest's frames to the tap, each straight from guest memory with one `writev`
    /// (no copy in the VMM: the tap's kernel side reads the guest's buffers once).
    pub(super) fn process_tx(&mut self) {
        let (tap, stats) = (&self.tap, &mut self.stats);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iovs = [empty; MAX_SEGMENTS];
        self.core.serve_queue(TXQ, |mem, chain| {
            let sent = gather_frame(mem, chain, &mut iovs)
                .and_then(|n| tap.write_gathered(&iovs[..n]).map_err(FrameError::Tap));
            match sent {
                Ok(_) => stats.tx_frames += 1,
                Err(why) => {
                    stats.tx_dropped += 1;
                    guest_warn!("virtio-net: guest frame dropped: {why}");
                }
            }
            ControlFlow::Continue(0)
        });
    }
}

/// Why a frame was dropped (no allocation: a flood of bad frames costs no heap).
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("descriptor of the wrong direction")]
    WrongDirection,
    #[error("buffer {0:#x}+{1} is not in guest memory")]
    BadBuffer(u64, usize),
    #[error("frame larger than {MAX_FRAME} bytes")]
    TooLarge,
    #[error("{0} bytes hold no Ethernet frame")]
    TooShort(usize),
    #[error("the RX chain holds only {0} bytes")]
    ChainTooSmall(usize),
    #[error("the tap refused it: {0}")]
    Tap(io::Error),
}

/// Reads the next frame from the tap into `rx`; false when there is none (or the tap failed).
fn read_tap(tap: &Tap, rx: &mut FrameBuf) -> bool {
    loop {
        match tap.read_frame(&mut rx.buf) {
            Ok(n) if n >= VNET_HDR_LEN => {
                rx.len = n;
                return true;
            }
            // A runt without a header: nothing a guest could use.
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                guest_warn!("virtio-net: cannot read from tap {}: {e}", tap.name());
                return false;
            }
        }
    }
}

/// Copies `frame` into the device-writable buffers of an RX chain; returns the used length.
fn write_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Result<u32, FrameError> {
    // num_buffers: without VIRTIO_NET_F_MRG_RXBUF every frame is one chain (5.1.6.4).
    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut done = 0;
    for (i, desc) in chain.enumerate() {
        if done == frame.len() {
            break;
        }
        if i >= MAX_DESCRIPTORS {
            return Err(FrameError::TooManyDescriptors);
        }
        if !desc.is_write_only() {
            return Err(FrameError::WrongDirection);
        }
        let n = (desc.len() as usize).min(frame.len() - done);
        mem.write_slice(&frame[done..done + n], desc.addr())
            .map_err(|_| FrameError::BadBuffer(desc.addr().0, n))?;
        done += n;
    }
    if done < frame.len() {
        return Err(FrameError::ChainTooSmall(done));
    }
    Ok(done as u32)
}

/// The most `writev` entries one TX frame takes: each descriptor's buffer, and one more for each
/// guest memory region boundary a buffer spans.
const MAX_SEGMENTS: usize = 2 * MAX_DESCRIPTORS;

/// Points `iovs` at a TX chain's buffers (virtio header and frame) in guest memory after checking
/// the chain; returns how many entries it used. The pointers are plain pointers into the guest
/// memory mapping (vm-memory's `xen` feature is off), valid while `mem` is borrowed.
fn gather_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    iovs: &mut [libc::iovec; MAX_SEGMENTS],
) -> Result<usize, FrameError> {
    let (mut count, mut len) = (0, 0usize);
    for (i, desc) in chain.enumerate() {
        if i >= MAX_DESCRIPTORS {
            return Err(FrameError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return Err(FrameError::WrongDirection);
        }
        let n = desc.len() as usize;
        len += n;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge);
        }
        for slice in mem.get_slices(desc.addr(), n) {
            let slice = slice.map_err(|_| FrameError::BadBuffer(desc.addr().0, n))?;
            let iov = iovs.get_mut(count).ok_or(FrameError::TooManyDescriptors)?;
            iov.iov_base = slice.ptr_guard().as_ptr().cast_mut().cast();
            iov.iov_len = slice.len();
            count += 1;
        }
    }
    if len <= VNET_HDR_LEN {
        return Err(FrameError::TooShort(len));
    }
    Ok(count)
}

impl VirtioDevice for Net {
    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs (8..10) is only valid with VIRTIO_NET_F_MQ: zero.
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn activated(&mut self) -> Result<(), ActivateError> {
        // The 12-byte header of every frame is virtio 1.x's; a legacy driver's is 10 bytes.
        if !self.core.has_features(VIRTIO_F_VERSION_1) {
            return Err(ActivateError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let offloads = GUEST_OFFLOADS
            .iter()
            .filter(|(feature, _)| self.core.has_features(bit(*feature)))
            .fold(0, |acc, (_, tun)| acc | tun);
        self.tap
            .set_offloads(offloads)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        // Frames may be waiting on the tap, and TX chains from before DRIVER_OK.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn resetting(&mut self) {
        self.rx.len = 0;
        if let Err(e) = self.tap.set_offloads(0) {
            tracing::warn!("virtio-net: {e}");
        }
    }
}

impl From<TapError> for NetError {
    fn from(e: TapError) -> Self {
        NetError::Tap(e)
    }
}
