//! virtio-blk event handling, in the VMM event thread.

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::error;
use vmm_sys_util::epoll::EventSet;

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            error!("virtio-blk: cannot register queue event: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != std::os::fd::AsRawFd::as_raw_fd(&self.queue_evts[0]) {
            return;
        }
        // Draining the eventfd first means a notification arriving while we work is not lost.
        let _ = self.queue_evts[0].read();
        self.process_queue();
    }
}
