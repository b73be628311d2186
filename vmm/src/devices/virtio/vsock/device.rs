//! The virtio side of the vsock device: configuration space, queues, and the processing entry
//! points the event handler calls.

use std::path::Path;
use std::sync::Arc;

use tracing::error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{GuestRx, VsockMuxer};
use super::VsockError;
use crate::devices::virtio::{
    device_type, read_config_space, take_queues, ActivateError, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};

/// Queue sizes: rx (host → guest), tx (guest → host), event.
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;

/// What an activated device holds.
struct Active {
    mem: GuestMemoryMmap,
    queues: [Queue; 3],
    irq: Arc<IrqTrigger>,
}

impl Active {
    /// Interrupts the guest once for everything returned this round, if it wants to know.
    fn notify(&mut self, rx_used: bool, tx_used: bool) {
        let mut needed = false;
        if rx_used {
            needed |= self.queues[RXQ]
                .needs_notification(&self.mem)
                .unwrap_or(true);
        }
        if tx_used {
            needed |= self.queues[TXQ]
                .needs_notification(&self.mem)
                .unwrap_or(true);
        }
        if needed {
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("vsock: cannot interrupt the guest: {e}");
            }
        }
    }
}

/// A virtio-vsock device whose host side is a Unix socket (see the module documentation).
pub struct Vsock {
    guest_cid: u64,
    pub(super) queue_evts: [EventFd; 3],
    acked_features: u64,
    active: Option<Active>,
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
        let evt = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::Sys {
                what: "a queue eventfd",
                source,
            })
        };
        Ok(Self {
            guest_cid,
            queue_evts: [evt()?, evt()?, evt()?],
            acked_features: 0,
            active: None,
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
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let [rxq, txq, _] = &mut active.queues;
        let mut tx_used = false;
        self.tx_stalled = false;
        loop {
            if self.muxer.ctl_backlogged() {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = txq.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            self.muxer.handle_tx_chain(mem, chain);
            if let Err(e) = txq.add_used(mem, head, 0) {
                guest_warn!("vsock: cannot return tx descriptor {head}: {e}");
            }
            tx_used = true;
        }
        let mut rx = GuestRx {
            mem,
            queue: rxq,
            used: false,
        };
        self.muxer.flush_ctl(&mut rx);
        let rx_used = rx.used;
        active.notify(rx_used, tx_used);
    }

    /// The guest added rx buffers.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut rx = GuestRx {
            mem: &active.mem,
            queue: &mut active.queues[RXQ],
            used: false,
        };
        self.muxer.on_rx_buffers(&mut rx);
        let rx_used = rx.used;
        active.notify(rx_used, false);
        self.resume_tx();
    }

    /// Host streams, the listener or the handshake timer are ready.
    pub(super) fn process_backend(&mut self) {
        match self.active.as_mut() {
            Some(active) => {
                let mut rx = GuestRx {
                    mem: &active.mem,
                    queue: &mut active.queues[RXQ],
                    used: false,
                };
                self.muxer.process_events(Some(&mut rx));
                let rx_used = rx.used;
                active.notify(rx_used, false);
                self.resume_tx();
            }
            None => self.muxer.process_events(None),
        }
    }

    fn resume_tx(&mut self) {
        if self.tx_stalled && !self.muxer.ctl_backlogged() {
            self.process_tx();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("vsock: config write at {offset:#x} ignored (read-only config space)");
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
        let queues = take_queues::<3>(&mem, queues)?;
        self.active = Some(Active { mem, queues, irq });
        self.muxer.set_guest_active(true);
        // Packets and buffers may have been queued before DRIVER_OK.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        // Every connection goes: the guest's sockets died with its driver.
        self.active = None;
        self.tx_stalled = false;
        self.muxer.set_guest_active(false);
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
