//! virtio-fs event handling, in the VMM event thread: the daemon's used-buffer notifications
//! ("calls") become the guest's interrupt, with `InterruptStatus` set so the driver looks.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::error;
use vmm_sys_util::epoll::EventSet;

use super::Fs;
use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.call_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                error!("virtio-fs: cannot register a call event: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(evt) = self.call_evts.iter().find(|e| e.as_raw_fd() == events.fd()) else {
            return;
        };
        // Drained first, so a call arriving while we raise the interrupt is not lost.
        let _ = evt.read();
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("virtio-fs: cannot interrupt the guest: {e}");
            }
        }
    }
}
