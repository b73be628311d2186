//! virtio-fs event handling, in the VMM event thread: the daemon's used-buffer notifications
//! ("calls") become the guest's interrupt, with `InterruptStatus` set so the driver looks. The
//! guest's queue notifications (kicks) are the daemon's to read: the VMM does not watch them.

use event_manager::Events;
use tracing::error;
use vmm_sys_util::epoll::EventSet;

use super::Fs;
use crate::devices::virtio::{VirtioDevice, VirtioEvents, VIRTIO_MMIO_INT_VRING};

/// Event data of the call eventfds: above any queue index, as [`VirtioEvents`] requires.
const CALL_DATA_BASE: u32 = 0x1000;

impl VirtioEvents for Fs {
    fn serves_queues(&self) -> bool {
        false
    }

    fn queue_notified(&mut self, _index: usize) {}

    fn backend_events(&self) -> Vec<Events> {
        self.call_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| Events::with_data(evt, CALL_DATA_BASE + i as u32, EventSet::IN))
            .collect()
    }

    fn backend_ready(&mut self, events: Events) {
        let Some(evt) = (events.data().checked_sub(CALL_DATA_BASE))
            .and_then(|i| self.call_evts.get(i as usize))
        else {
            return;
        };
        // Drained first, so a call arriving while we raise the interrupt is not lost.
        let _ = evt.read();
        if let Some(active) = self.core().active() {
            if let Err(e) = active.irq().trigger(VIRTIO_MMIO_INT_VRING) {
                error!("virtio-fs: cannot interrupt the guest: {e}");
            }
        }
    }
}
