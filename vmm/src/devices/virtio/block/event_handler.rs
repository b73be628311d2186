//! virtio-blk event handling, in the VMM event thread: one request queue.

use super::Block;
use crate::devices::virtio::VirtioEvents;

impl VirtioEvents for Block {
    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }
}
