//! virtio-rng event handling, in the VMM event thread: one queue, nothing on the host side.

use super::Rng;
use crate::devices::virtio::VirtioEvents;

impl VirtioEvents for Rng {
    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }
}
