//! The virtio side of the vsock device: configuration space, queues, and the processing entry
//! points the event handler calls.

use std::ops::ControlFlow;
use std::path::Path;

use super::muxer::{GuestRx, VsockMuxer};
use super::VsockError;
use crate::devices::virtio::{
    device_type, read_config_space, ActivateError, DeviceCore, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Queue sizes: rx (host → guest), tx (guest → host), event.
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;

/// A virtio-vsock device whose host side is a Unix socket (see the module documentation).
pub struct Vsock {
    pub(super) core: DeviceCore,
    guest_cid: u64,
    pub(super) muxer: VsockMuxer,
    /// The tx queue was left with packets because control packets were backed up.
    tx_stalled: bool,
}

impl Vsock {
    /// Creates the device for a guest with CID `guest_cid`, listening for host connections on
    /// `uds_path` (a stale socket file there is replaced; any other file is an error). Guest
    /// connections to host port `P` go to `<uds_path>_<P>`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        // 0, 1 and 2 are reserved, u32::MAX is VMADDR_CID_ANY, the upper 32 bits are reserved.
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let core = DeviceCore::new("vsock", device_type::VSOCK, VIRTIO_F_VERSION_1, QUEUE_SIZES)
            .map_err(|source| VsockError::Sys {
                what: "a queue eventfd",
                source,
            })?;
        Ok(Self {
            core,
            guest_cid,
            muxer: VsockMuxer::new(guest_cid, uds_path)?,
            tx_stalled: false,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Handles the guest's packets on the tx queue.
    pub(super) fn process_tx(&mut self) {
        let muxer = &mut self.muxer;
        // The tx queue is not read while control packets for the guest are backed up.
        self.tx_stalled = muxer.ctl_backlogged();
        let tx_used = !self.tx_stalled
            && self.core.process_chains(TXQ, |mem, chain| {
                muxer.handle_tx_chain(mem, chain);
                if muxer.ctl_backlogged() {
                    ControlFlow::Break(0)
                } else {
                    ControlFlow::Continue(0)
                }
            });
        self.tx_stalled |= self.muxer.ctl_backlogged();
        let rx_used = self.with_rx(|muxer, rx| {
            muxer.flush_ctl(rx);
        });
        self.signal(rx_used, tx_used);
    }

    /// The guest added rx buffers.
    pub(super) fn process_rx(&mut self) {
        let rx_used = self.with_rx(|muxer, rx| muxer.on_rx_buffers(rx));
        self.signal(rx_used, false);
        self.resume_tx();
    }

    /// Host streams, the listener or the handshake timer are ready.
    pub(super) fn process_backend(&mut self) {
        if !self.core.is_activated() {
            self.muxer.process_events(None);
            return;
        }
        let rx_used = self.with_rx(|muxer, rx| muxer.process_events(Some(rx)));
        self.signal(rx_used, false);
        self.resume_tx();
    }

    /// Runs `f` with the muxer and the guest's rx queue; returns whether `f` used rx buffers.
    fn with_rx(&mut self, f: impl FnOnce(&mut VsockMuxer, &mut GuestRx<'_>)) -> bool {
        let Some(active) = self.core.active_mut() else {
            return false;
        };
        let mut rx = GuestRx {
            mem: &active.mem,
            queue: &mut active.queues[RXQ],
            used: false,
        };
        f(&mut self.muxer, &mut rx);
        rx.used
    }

    /// Interrupts the guest once for everything returned this round, if it wants to know.
    fn signal(&mut self, rx_used: bool, tx_used: bool) {
        let used = [(RXQ, rx_used), (TXQ, tx_used)];
        self.core
            .signal_used(used.into_iter().filter(|u| u.1).map(|u| u.0));
    }

    fn resume_tx(&mut self) {
        if self.tx_stalled && !self.muxer.ctl_backlogged() {
            self.process_tx();
        }
    }
}

impl VirtioDevice for Vsock {
    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activated(&mut self) -> Result<(), ActivateError> {
        self.muxer.set_guest_active(true);
        // Packets and buffers may have been queued before DRIVER_OK.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn resetting(&mut self) {
        // Every connection goes: the guest's sockets died with its driver.
        self.tx_stalled = false;
        self.muxer.set_guest_active(false);
    }
}
