//! virtio-net event handling, in the VMM event thread: the two queue eventfds and the tap.

use event_manager::Events;
use vmm_sys_util::epoll::EventSet;

use super::device::{RXQ, TXQ};
use super::Net;
use crate::devices::virtio::VirtioEvents;

/// Event data of the tap fd; the queue eventfds use their queue index.
const TAP: u32 = 2;

impl VirtioEvents for Net {
    fn queue_notified(&mut self, index: usize) {
        match index {
            // New RX buffers: a frame may be waiting for them.
            RXQ => self.process_rx(),
            TXQ => self.process_tx(),
            _ => {}
        }
    }

    fn backend_events(&self) -> Vec<Events> {
        // Edge-triggered: `process_rx` reads until the tap is empty or the guest has no buffer,
        // and a tap that stays readable while the guest has none must not wake the loop.
        let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        vec![Events::with_data(&self.tap, TAP, set)]
    }

    fn backend_ready(&mut self, _events: Events) {
        self.process_rx();
    }
}
