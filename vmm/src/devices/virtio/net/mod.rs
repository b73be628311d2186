//! virtio-net (virtio 1.x, 5.1): one RX and one TX queue backed by a host tap device.
//!
//! # Data path
//!
//! Frames cross between guest buffers and the tap with the 12-byte `virtio_net_hdr_v1` in front,
//! which both sides speak (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), so the device copies and never
//! parses or rewrites a frame (except `num_buffers`, always 1: no mergeable RX buffers). RX has
//! one frame buffer of [`MAX_FRAME`] bytes, allocated with the device; TX needs none: no
//! allocation per packet.
//!
//! * TX: a notification of the TX queue checks each chain and writes it to the tap with one
//!   `writev(2)` straight from the guest's buffers, as QEMU does (no copy in the VMM).
//! * RX: the tap is watched edge-triggered. When it is readable, or when the guest adds RX
//!   buffers, frames are read until the tap is empty; a frame that finds no RX buffer waits in
//!   the RX buffer (one frame) until the guest adds buffers, and the tap is not read meanwhile,
//!   so further frames queue in the kernel, which drops them beyond the tap's queue length.
//!
//! # Offloads
//!
//! At creation the tap is asked which offloads it takes (`TUNSETOFFLOAD`, richest set first);
//! only those are offered: `GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_UFO` each need the matching
//! `TUN_F_*`; `CSUM` and `HOST_TSO4/6` (frames from the guest) need a tap that takes virtio
//! headers with checksum offload, `HOST_UFO` one whose kernel knows UFO. At activation the tap's
//! offloads are set to what the driver accepted, so the kernel never hands the guest a frame it
//! cannot take; a reset sets them back to none.
//!
//! # Configuration
//!
//! The tap is named (`NetConfig::tap_name`): the VMM attaches to it, or creates it if it does not
//! exist, and sets its MTU to the guest's. Opening by name needs `CAP_NET_ADMIN` and finds the
//! tap in the VMM's own network namespace. A tap in another namespace (a pod's, plumbed by the
//! `hostnet` crate) comes as an already attached fd instead: [`Tap::from_fd`] takes it over
//! (its MTU left as its owner set it) and [`Net::with_tap`] builds the device on it.
//!
//! # Hostile guest
//!
//! A chain with a descriptor of the wrong direction, a buffer outside guest memory, more than
//! [`MAX_DESCRIPTORS`] descriptors, a TX frame larger than [`MAX_FRAME`] bytes or without an
//! Ethernet frame, or an RX chain too small for the frame: the frame is dropped, counted
//! ([`NetStats`]) and logged (rate-limited), and the chain goes back to the guest (used length 0
//! for RX). A TX flood is served one queue's worth per event-loop round (see `DeviceCore`), so
//! other devices keep their turn; an RX queue that is never refilled costs one frame of memory.
//! The tap rejects malformed virtio headers itself (`EINVAL`), which is one more dropped frame.

mod device;
mod event_handler;
mod tap;
#[cfg(test)]
mod tests;

pub use device::{Net, NetStats};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// The largest frame either way, virtio header included: the 12-byte header, the 14-byte
/// Ethernet header and 64 KiB (the largest TSO/UFO super-frame, and more than any MTU).
pub const MAX_FRAME: usize = 65562;
/// The most descriptors one frame's chain may have (Linux uses at most 19: the header and up to
/// 17 pages plus one).
pub const MAX_DESCRIPTORS: usize = 64;

/// Why a net device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(TapError),
    #[error("MTU {0} is below the 68 bytes IPv4 needs")]
    Mtu(u16),
    #[error("MAC {0:02x?} is not a unicast address")]
    Mac([u8; 6]),
    #[error("cannot create the queue eventfds: {0}")]
    EventFd(std::io::Error),
}
