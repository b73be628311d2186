//! virtio-vsock event handling, in the VMM event thread.
//!
//! Besides the three queue eventfds, one fd is watched: the muxer's epoll fd, which stands for
//! every host stream, the listening socket and the handshake timer (see the module docs).

use event_manager::Events;
use vmm_sys_util::epoll::EventSet;

use super::device::{EVQ, RXQ, TXQ};
use super::Vsock;
use crate::devices::virtio::VirtioEvents;

/// Event data of the muxer's epoll fd; the queue eventfds use their queue index.
const BACKEND: u32 = 3;

impl VirtioEvents for Vsock {
    fn queue_notified(&mut self, index: usize) {
        match index {
            RXQ => self.process_rx(),
            TXQ => self.process_tx(),
            // The device never sends events (only TRANSPORT_RESET exists, for migration); the
            // guest's event buffers simply stay queued.
            EVQ => {}
            _ => {}
        }
    }

    fn backend_events(&self) -> Vec<Events> {
        vec![Events::with_data_raw(
            self.muxer.epoll_fd(),
            BACKEND,
            EventSet::IN,
        )]
    }

    fn backend_ready(&mut self, _events: Events) {
        self.process_backend();
    }
}
