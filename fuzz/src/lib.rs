//! What the fuzz targets share: a hostile guest driver that lays out split virtqueues in real
//! guest memory, adds descriptor chains to them, scribbles over memory (rings included) and
//! notifies queues, driving a device through the same entry points the VMM's event loop uses
//! ([`VirtioDevice::activate`], [`VirtioEvents::queue_notified`],
//! [`VirtioEvents::backend_ready`]), which all end in the shared `DeviceCore`.

pub mod tree;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::{IrqTrigger, VirtioDevice, VirtioEvents};

/// Guest memory: one region from 0, rings in the first [`DATA_BASE`] bytes, buffers above.
pub const MEM_SIZE: usize = 0x10_0000;
/// Where buffers (and the fuzzer's initial data) start.
pub const DATA_BASE: u64 = 0x1_0000;
/// Each queue's rings: descriptor table at +0, avail ring at +0x1000, used ring at +0x2000.
const QUEUE_STRIDE: u64 = 0x4000;
/// Bounds per input, so one input cannot run for long.
const MAX_STEPS: usize = 64;

/// Reads a fuzz input as little-endian fields; past its end every field reads as zero, so any
/// input decodes. A plain byte format (rather than `arbitrary`'s) so that the corpus seeds in
/// `corpus/` can be written by hand (`corpus/seeds.py`) as real driver sessions.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// `n:u8` then `n` bytes.
    pub fn short_bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.bytes(n)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// One descriptor: 13 bytes, `flags addr:u64 len:u16 next:u16`.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Inside guest memory (`DATA_BASE + addr % 64 KiB`) unless `raw`.
    pub addr: u64,
    pub raw_addr: bool,
    /// Lengths are mostly small; `huge` makes one of the largest (`u32::MAX - len`).
    pub len: u16,
    pub huge: bool,
    /// Device-writable.
    pub write: bool,
    /// Points to an indirect table (at `addr`).
    pub indirect: bool,
    /// A `next` other than the following slot (loops, out-of-range indices).
    pub next: Option<u16>,
}

impl Desc {
    fn read(r: &mut Input<'_>) -> Self {
        let flags = r.u8();
        let addr = r.u64();
        let len = r.u16();
        let next = r.u16();
        Self {
            addr,
            raw_addr: flags & 1 != 0,
            len,
            huge: flags & 2 != 0,
            write: flags & 4 != 0,
            indirect: flags & 8 != 0,
            next: (flags & 16 != 0).then_some(next),
        }
    }
}

/// One thing the guest does; a kind byte, then its fields.
#[derive(Debug, Clone)]
pub enum Step {
    /// 0 `queue:u8 n:u8 Desc*n`: adds a chain to the avail ring of a queue (no notification).
    Chain { queue: u8, descs: Vec<Desc> },
    /// 1 `queue:u8`: notifies a queue (`QueueNotify`).
    Notify { queue: u8 },
    /// 2 `at:u32 n:u8 bytes*n`: writes anywhere in guest memory (rings, buffers, tables).
    Poke { at: u32, bytes: Vec<u8> },
    /// 3: a host-side fd of the device became ready.
    Backend,
}

/// One fuzz input for a device target:
/// `features:u64 queue_size_log2:[u8;4] data_len:u16 data Step*`.
#[derive(Debug, Clone)]
pub struct DeviceInput {
    /// Features the driver accepts (the device keeps only those it offered).
    pub features: u64,
    /// log2 of each queue's size (capped at the device's maximum).
    pub queue_size_log2: [u8; 4],
    /// Written at [`DATA_BASE`] before the device starts: packet headers, requests, tables.
    pub data: Vec<u8>,
    pub steps: Vec<Step>,
}

impl DeviceInput {
    pub fn read(r: &mut Input<'_>) -> Self {
        let features = r.u64();
        let queue_size_log2 = r.array();
        let n = usize::from(r.u16());
        let data = r.bytes(n).to_vec();
        let mut steps = Vec::new();
        while !r.is_empty() && steps.len() < MAX_STEPS {
            steps.push(match r.u8() % 4 {
                0 => {
                    let queue = r.u8();
                    let n = r.u8();
                    let descs = (0..n).map(|_| Desc::read(r)).collect();
                    Step::Chain { queue, descs }
                }
                1 => Step::Notify { queue: r.u8() },
                2 => Step::Poke {
                    at: r.u32(),
                    bytes: r.short_bytes().to_vec(),
                },
                _ => Step::Backend,
            });
        }
        Self {
            features,
            queue_size_log2,
            data,
            steps,
        }
    }
}

/// The guest's side of a device's queues.
pub struct Driver {
    pub mem: GuestMemoryMmap,
    queues: Vec<DriverQueue>,
}

struct DriverQueue {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// Queues of the given sizes (each a power of two, at most 256) in fresh guest memory.
    pub fn new(sizes: &[u16]) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("mmap guest memory");
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| DriverQueue {
                base: i as u64 * QUEUE_STRIDE,
                size,
                next_desc: 0,
                avail_idx: 0,
            })
            .collect();
        Self { mem, queues }
    }

    /// The queues as the transport hands them to the device at `DRIVER_OK`.
    pub fn device_queues(&self, max_sizes: &[u16]) -> Vec<Queue> {
        self.queues
            .iter()
            .zip(max_sizes)
            .map(|(q, &max)| {
                let mut queue = Queue::new(max).expect("device queue size");
                queue.set_size(q.size);
                queue.set_desc_table_address(Some(q.base as u32), Some(0));
                queue.set_avail_ring_address(Some((q.base + 0x1000) as u32), Some(0));
                queue.set_used_ring_address(Some((q.base + 0x2000) as u32), Some(0));
                queue.set_ready(true);
                queue
            })
            .collect()
    }

    /// Writes `descs` into consecutive descriptor slots and makes their head available.
    pub fn add_chain(&mut self, queue: usize, descs: &[Desc]) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let head = q.next_desc;
        let n = descs.len();
        for (i, d) in descs[..n].iter().enumerate() {
            let idx = (head as usize + i) % q.size as usize;
            let next_slot = ((idx + 1) % q.size as usize) as u16;
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if d.indirect {
                flags |= VRING_DESC_F_INDIRECT as u16;
            }
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let addr = if d.raw_addr {
                d.addr
            } else {
                DATA_BASE + (d.addr & 0xffff)
            };
            let len = if d.huge {
                u32::MAX - u32::from(d.len)
            } else {
                u32::from(d.len)
            };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&d.next.unwrap_or(next_slot).to_le_bytes());
            let at = q.base + 16 * idx as u64;
            self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        }
        q.next_desc = ((head as usize + n.max(1)) % q.size as usize) as u16;
        let slot = q.base + 0x1000 + 4 + 2 * u64::from(q.avail_idx % q.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(q.avail_idx, GuestAddress(q.base + 0x1000 + 2))
            .unwrap();
    }

    /// Writes `bytes` at `at` (wrapped into guest memory, cut at its end).
    pub fn poke(&self, at: u32, bytes: &[u8]) {
        let at = at as usize % MEM_SIZE;
        let n = bytes.len().min(MEM_SIZE - at);
        self.mem
            .write_slice(&bytes[..n], GuestAddress(at as u64))
            .unwrap();
    }

    /// The used ring's index of `queue`: how many chains the device returned (mod 2^16).
    pub fn used_idx(&self, queue: usize) -> u16 {
        let base = self.queues[queue].base;
        self.mem.read_obj(GuestAddress(base + 0x2000 + 2)).unwrap()
    }
}

/// Activates `dev` with queues laid out by a fresh [`Driver`] and plays `input`'s steps, calling
/// `backend` for [`Step::Backend`] and `check` after every step. Returns the driver, or `None`
/// when the device refused activation (as it may: the guest picked the features).
pub fn drive<D: VirtioDevice + VirtioEvents>(
    dev: &mut D,
    input: &DeviceInput,
    mut check: impl FnMut(&mut D, &Driver),
) -> Option<Driver> {
    let max_sizes = dev.core().queue_max_sizes();
    let sizes: Vec<u16> = max_sizes
        .iter()
        .zip(input.queue_size_log2.iter().cycle())
        .map(|(&max, &log2)| (1u16 << (log2 % 9)).min(max))
        .collect();
    let mut driver = Driver::new(&sizes);
    driver.poke(DATA_BASE as u32, &input.data);
    dev.core_mut().set_acked_features(input.features);
    let irq = Arc::new(IrqTrigger::new().expect("eventfd"));
    let queues = driver.device_queues(max_sizes);
    dev.activate(driver.mem.clone(), queues, irq).ok()?;
    let nqueues = sizes.len();
    for step in &input.steps {
        match step {
            Step::Chain { queue, descs } => driver.add_chain(*queue as usize % nqueues, descs),
            Step::Notify { queue } => dev.queue_notified(*queue as usize % nqueues),
            Step::Poke { at, bytes } => driver.poke(*at, bytes),
            Step::Backend => {
                // The device ignores which of its fds fired; any fd will do.
                let fd = dev.core().queue_events()[0].as_raw_fd();
                dev.backend_ready(event_manager::Events::empty_raw(fd));
            }
        }
        check(dev, &driver);
    }
    Some(driver)
}
