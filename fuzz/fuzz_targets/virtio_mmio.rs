//! The virtio-mmio transport as a vCPU sees it: register reads and writes of any offset, size
//! and value (feature negotiation, queue setup, status changes, resets, config space), guest
//! memory writes, and queue notifications served the way the event loop serves them (the
//! queue's eventfd, then the device's `queue_notified`). The device behind it is a real one:
//! virtio-rng, or virtio-blk on a temp file (which has a config space).
#![no_main]

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use microvm_fuzz::{Driver, Input};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::rng::Rng;
use vmm::devices::virtio::{MmioTransport, VirtioDevice, VirtioEvents, QUEUE_NOTIFY_OFFSET};
use vmm::devices::BusDevice;

/// One vCPU access or event; a kind byte, then its fields.
#[derive(Debug)]
enum Op {
    /// 0 `offset:u16 size:u8`
    Read { offset: u16, size: u8 },
    /// 1 `offset:u16 size:u8 value:u64`
    Write { offset: u16, size: u8, value: u64 },
    /// 2 `index:u8 value:u32`: a 32-bit write to register `index * 4` of the first 0x100
    /// bytes (most land on a real register).
    Reg { index: u8, value: u32 },
    /// 3 `at:u32 n:u8 bytes*n`: the guest writes memory (rings, descriptors, buffers).
    Poke { at: u32, bytes: Vec<u8> },
    /// 4: the event loop runs: each signalled queue eventfd is served.
    EventLoop,
}

fn read_ops(r: &mut Input<'_>) -> Vec<Op> {
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < 256 {
        ops.push(match r.u8() % 5 {
            0 => Op::Read {
                offset: r.u16(),
                size: r.u8(),
            },
            1 => Op::Write {
                offset: r.u16(),
                size: r.u8(),
                value: r.u64(),
            },
            2 => Op::Reg {
                index: r.u8(),
                value: r.u32(),
            },
            3 => Op::Poke {
                at: r.u32(),
                bytes: r.short_bytes().to_vec(),
            },
            _ => Op::EventLoop,
        });
    }
    ops
}

fn disk() -> &'static PathBuf {
    static DISK: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DISK
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("disk.img");
            File::create(&path)
                .and_then(|f| f.set_len(8192))
                .expect("disk image");
            (dir, path)
        })
        .1
}

fn run<D: VirtioDevice + VirtioEvents + 'static>(dev: D, ops: &[Op]) {
    let driver = Driver::new(&[]);
    let dev = Arc::new(Mutex::new(dev));
    let dyn_dev: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let mut transport = MmioTransport::new(driver.mem.clone(), dyn_dev).expect("transport");
    for op in ops {
        match op {
            Op::Read { offset, size } => {
                let mut data = vec![0xa5u8; usize::from(size % 9)];
                transport.read(u64::from(*offset), &mut data);
            }
            Op::Write {
                offset,
                size,
                value,
            } => {
                let n = usize::from(size % 9);
                transport.write(u64::from(*offset), &value.to_le_bytes()[..n]);
            }
            Op::Reg { index, value } => {
                let offset = u64::from(index & 0x3f) * 4;
                transport.write(offset, &value.to_le_bytes());
            }
            Op::Poke { at, bytes } => driver.poke(*at, bytes),
            Op::EventLoop => {
                let mut dev = dev.lock().unwrap();
                let ready: Vec<usize> = (0..dev.core().queue_events().len())
                    .filter(|&i| dev.core().queue_events()[i].read().is_ok())
                    .collect();
                for i in ready {
                    dev.queue_notified(i);
                }
            }
        }
        // Whatever the guest did, the transport still identifies itself.
        let mut magic = [0u8; 4];
        transport.read(0, &mut magic);
        assert_eq!(&magic, b"virt");
    }
    // QueueNotify for queues that do not exist is refused, not a panic.
    transport.write(QUEUE_NOTIFY_OFFSET, &u32::MAX.to_le_bytes());
}

// `device:u8` (odd: virtio-blk, even: virtio-rng), then `Op*`.
fuzz_target!(|data: &[u8]| {
    let mut r = Input(data);
    let block = r.u8() & 1 != 0;
    let ops = read_ops(&mut r);
    if block {
        run(Block::new(disk(), false).expect("disk"), &ops);
    } else {
        run(Rng::new().expect("rng"), &ops);
    }
});
