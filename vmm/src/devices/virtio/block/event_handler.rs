//! virtio-blk event handling, in the VMM event thread: one request queue, and the rate limit's
//! timer when the disk has a limit.

use event_manager::Events;
use vmm_sys_util::epoll::EventSet;

use super::Block;
use crate::devices::virtio::VirtioEvents;

/// The timer's event data: not a queue index (the device has queue 0 only).
pub(super) const THROTTLE_TIMER: u32 = 1;

impl VirtioEvents for Block {
    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }

    fn backend_events(&self) -> Vec<Events> {
        self.throttle
            .iter()
            .map(|t| Events::with_data(&t.timer, THROTTLE_TIMER, EventSet::IN))
            .collect()
    }

    fn backend_ready(&mut self, events: Events) {
        if events.data() != THROTTLE_TIMER {
            return;
        }
        if let Some(throttle) = &mut self.throttle {
            throttle.timer_fired();
            self.process_queue();
        }
    }
}
