//! virtio-vsock event handling, in the VMM event thread.
//!
//! Four fds are registered: the three queue eventfds and the muxer's epoll fd, which stands for
//! every host stream, the listening socket and the handshake timer (see the module docs).

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{error, warn};
use vmm_sys_util::epoll::EventSet;

use super::device::{EVQ, RXQ, TXQ};
use super::Vsock;

/// Event data of the muxer's epoll fd; the queue eventfds use their queue index.
const BACKEND: u32 = 3;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error!("vsock: cannot register queue {i} event: {e}");
            }
        }
        let backend = Events::with_data_raw(self.muxer.epoll_fd(), BACKEND, EventSet::IN);
        if let Err(e) = ops.add(backend) {
            error!("vsock: cannot register the host side: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Draining an eventfd before the work means a notification arriving meanwhile is kept.
        match events.data() as usize {
            RXQ => {
                let _ = self.queue_evts[RXQ].read();
                self.process_rx();
            }
            TXQ => {
                let _ = self.queue_evts[TXQ].read();
                self.process_tx();
            }
            EVQ => {
                // The device never sends events (only TRANSPORT_RESET exists, for migration);
                // the guest's event buffers simply stay queued.
                let _ = self.queue_evts[EVQ].read();
            }
            d if d == BACKEND as usize => self.process_backend(),
            d => warn!("vsock: event with unknown data {d}"),
        }
    }
}
