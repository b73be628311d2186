//! The rate limit in the device: requests over budget stay on the available ring, the timer is
//! armed, and its expiry serves them. Time is a [`ManualClock`]; nothing here waits.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use event_manager::Events;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_api::{RateLimitConfig, TokenBucketConfig};
use vmm_sys_util::epoll::EventSet;

use super::event_handler::THROTTLE_TIMER;
use super::Block;
use crate::devices::io_limiter::{IoLimiter, ManualClock};
use crate::devices::virtio::test_utils::{
    add_chain, queue_with_used_ring, used_elem, used_idx, QSIZE,
};
use crate::devices::virtio::{IrqTrigger, VirtioDevice, VirtioEvents};

const USED: u64 = 0x2000;
const HEADERS: u64 = 0x8000;
const STATUSES: u64 = 0x9000;
const DATA: u64 = 0x10000;
const MEM_SIZE: usize = 0x40000;
const SECTORS: u64 = 64;

/// Sector `s` is filled with byte `s`.
fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for s in 0..SECTORS {
        f.write_all(&[s as u8; 512]).unwrap();
    }
    f
}

fn ops(size: u64, refill_time_ms: u64) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig::new(size, refill_time_ms)),
    }
}

fn bandwidth(size: u64, refill_time_ms: u64) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: Some(TokenBucketConfig::new(size, refill_time_ms)),
        ops: None,
    }
}

/// An activated disk whose queue holds one read of `sectors[i]` sectors from sector `i` per
/// entry, all queued before activation.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    block: Block,
    clock: ManualClock,
    lens: Vec<u64>,
    _image: tempfile::NamedTempFile,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, limit: Option<&RateLimitConfig>, lens: &[u64]) -> Self {
        let img = image();
        let clock = ManualClock::default();
        let mut block = Block::new(img.path(), true).unwrap();
        if let Some(config) = limit {
            let limiter = IoLimiter::new(config, Box::new(clock.clone()));
            block = block.with_limiter(limiter).unwrap();
        }
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let mut next = 0;
        for (i, &sectors) in lens.iter().enumerate() {
            let i = i as u64;
            let header = HEADERS + 16 * i;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            h[8..].copy_from_slice(&i.to_le_bytes());
            mem.write_slice(&h, GuestAddress(header)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUSES + i)).unwrap();
            let data = (DATA + 0x1000 * i, 512 * sectors as u32, true);
            add_chain(
                &vq,
                &mut next,
                &[(header, 16, false), data, (STATUSES + i, 1, true)],
            );
        }
        let irq = Arc::new(IrqTrigger::new().unwrap());
        block
            .activate(mem.clone(), vec![queue_with_used_ring(&vq, USED)], irq)
            .unwrap();
        Self {
            mem,
            block,
            clock,
            lens: lens.to_vec(),
            _image: img,
        }
    }

    /// Requests served so far; each one checked (in order, status OK, the right sectors).
    fn served(&self) -> u16 {
        let n = used_idx(self.mem, USED);
        for i in 0..n {
            let (id, len) = used_elem(self.mem, USED, i);
            assert_eq!(id, 3 * u32::from(i), "request {i} served out of order");
            let bytes = 512 * self.lens[usize::from(i)];
            assert_eq!(len, bytes as u32 + 1);
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(STATUSES + u64::from(i)))
                .unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK as u8);
            let mut got = vec![0u8; bytes as usize];
            let at = GuestAddress(DATA + 0x1000 * u64::from(i));
            self.mem.read_slice(&mut got, at).unwrap();
            // Request i reads from sector i on.
            let want: Vec<u8> = (0..bytes).map(|b| (u64::from(i) + b / 512) as u8).collect();
            assert_eq!(got, want, "request {i} read the wrong data");
        }
        n
    }

    fn timer_armed(&self) -> bool {
        let throttle = self.block.throttle.as_ref().expect("a limited disk");
        throttle.timer.is_armed().unwrap()
    }

    /// `ms` later, the timer fires: returns the requests served by then.
    fn after_ms(&mut self, ms: u64) -> u16 {
        self.clock.advance(Duration::from_millis(ms));
        self.timer_fires();
        self.served()
    }

    /// What the event loop does when the timer fd is readable.
    fn timer_fires(&mut self) {
        let timer = &self.block.throttle.as_ref().unwrap().timer;
        let events = Events::with_data(timer, THROTTLE_TIMER, EventSet::IN);
        self.block.backend_ready(events);
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

#[test]
fn over_the_ops_limit_requests_wait_on_the_ring_for_the_timer() {
    let mem = mem();
    // Two operations per second.
    let limit = ops(2, 1000);
    let mut rig = Rig::new(&mem, Some(&limit), &[1; 5]);
    assert_eq!(rig.served(), 2);
    assert_eq!(rig.block.stats().throttled, 1);
    assert!(rig.timer_armed());
    assert_eq!(rig.block.backend_events().len(), 1);

    // The guest kicking the queue meanwhile changes nothing.
    rig.block.queue_notified(0);
    assert_eq!(rig.served(), 2);
    assert_eq!(rig.block.stats().throttled, 1);

    // Half a second refills one operation.
    assert_eq!(rig.after_ms(500), 3);
    assert_eq!(rig.block.stats().throttled, 2);
    assert!(rig.timer_armed());

    assert_eq!(rig.after_ms(1000), 5);
    assert_eq!(rig.block.stats().throttled, 2);
}

#[test]
fn a_timer_that_fires_early_serves_nothing_and_rearms() {
    let mem = mem();
    let limit = ops(1, 1000);
    let mut rig = Rig::new(&mem, Some(&limit), &[1; 2]);
    assert_eq!(rig.served(), 1);
    assert_eq!(rig.after_ms(999), 1);
    assert_eq!(rig.block.stats().throttled, 2);
    assert!(rig.timer_armed());
    assert_eq!(rig.after_ms(1), 2);
}

#[test]
fn the_bandwidth_limit_counts_bytes_and_admits_a_request_larger_than_the_bucket() {
    let mem = mem();
    // 1 KiB per 100 ms.
    let limit = bandwidth(1024, 100);
    let mut rig = Rig::new(&mem, Some(&limit), &[1, 1, 1, 4, 1]);
    assert_eq!(rig.served(), 2);
    assert_eq!(rig.after_ms(50), 3);
    // 2 KiB: needs a full bucket (100 ms from empty), then leaves 1 KiB of debt.
    assert_eq!(rig.after_ms(99), 3);
    assert_eq!(rig.after_ms(1), 4);
    // The debt and the next 512 bytes: 150 ms.
    assert_eq!(rig.after_ms(149), 4);
    assert_eq!(rig.after_ms(1), 5);
}

#[test]
fn an_unlimited_disk_serves_everything_at_once_without_a_timer() {
    let mem = mem();
    let mut rig = Rig::new(&mem, None, &[1; 40]);
    assert_eq!(rig.served(), 40);
    assert_eq!(rig.block.stats().throttled, 0);
    assert!(rig.block.backend_events().is_empty());
    // A limit without buckets is no limit.
    let img = image();
    let block = Block::new(img.path(), true).unwrap();
    let block = block.with_rate_limit(&RateLimitConfig::default()).unwrap();
    assert!(block.throttle.is_none());
    // A kick with nothing new does nothing.
    rig.block.queue_notified(0);
    assert_eq!(rig.served(), 40);
}

#[test]
fn a_reset_disarms_the_timer() {
    let mem = mem();
    let limit = ops(1, 1000);
    let mut rig = Rig::new(&mem, Some(&limit), &[1; 3]);
    assert!(rig.timer_armed());
    rig.block.reset();
    assert!(!rig.timer_armed());
    // A stale expiry after the reset finds no queue and does not block.
    rig.timer_fires();
    assert_eq!(rig.served(), 1);
}
