//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2).
//!
//! Register accesses arrive from vCPU threads as MMIO exits. Queue notifications do not come
//! through here: `QueueNotify` is backed by one ioeventfd per queue (see [`VirtioDevice::queue_events`]).

use std::sync::{Arc, Mutex};

use tracing::error;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{IrqTrigger, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};
use crate::devices::bus::BusDevice;

const MMIO_MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4d55; // "UMVM"

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Register offsets (virtio 1.x, 4.2.2).
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the `QueueNotify` register, where the transport's ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// The size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// The transport state of one virtio-mmio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> std::io::Result<Self> {
        let queues = fresh_queues(&*lock(&device));
        Ok(Self {
            device,
            mem,
            irq: Arc::new(IrqTrigger::new()?),
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The interrupt line, to be registered as an irqfd.
    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status register, for tests and diagnostics.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & status::DRIVER_OK != 0 {
            // Queue configuration is frozen once the device runs (4.2.3.2).
            guest_warn!("virtio-mmio: queue register write after DRIVER_OK ignored");
            return None;
        }
        let sel = self.queue_sel as usize;
        let q = self.queues.get_mut(sel);
        if q.is_none() {
            guest_warn!("virtio-mmio: access to queue {sel}, which does not exist");
        }
        q
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let device = lock(&self.device);
        let sel_queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => device.core().device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => device.core().avail_features() as u32,
                1 => (device.core().avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => sel_queue.map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => sel_queue.map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_u32(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    guest_warn!("virtio-mmio: feature write after FEATURES_OK ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | ((v as u64) << 32)
                    }
                    sel => guest_warn!("virtio-mmio: driver features select {sel} ignored"),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.set_queue_addr(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => {
                self.set_queue_addr(|q| q.set_desc_table_address(None, Some(v)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_queue_addr(|q| q.set_avail_ring_address(Some(v), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_queue_addr(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_queue_addr(|q| q.set_used_ring_address(Some(v), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_queue_addr(|q| q.set_used_ring_address(None, Some(v)))
            }
            // Only reaches us when no ioeventfd is registered (unit tests, or a queue index the
            // device does not have); the device's own eventfds carry real notifications.
            reg::QUEUE_NOTIFY => {
                let device = lock(&self.device);
                match device.core().queue_events().get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            error!("virtio-mmio: cannot signal queue {v}: {e}");
                        }
                    }
                    None => guest_warn!("virtio-mmio: notify for queue {v}, which does not exist"),
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.write_status(v),
            _ => guest_warn!("virtio-mmio: write of unknown or read-only register {offset:#x}"),
        }
    }

    fn set_queue_addr(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if v & self.status != self.status {
            // The driver may only add bits (3.1.1); anything else but a reset is a driver bug.
            guest_warn!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        if newly & status::FEATURES_OK != 0 {
            let mut device = lock(&self.device);
            let unsupported = self.acked_features & !device.core().avail_features();
            if unsupported != 0 {
                guest_warn!("virtio-mmio: driver accepted unoffered features {unsupported:#x}");
                // Leave FEATURES_OK clear: the driver reads it back and gives up (3.1.1).
                self.status = v & !status::FEATURES_OK;
                return;
            }
            device.core_mut().set_acked_features(self.acked_features);
        }
        self.status = v;
        if newly & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut device = lock(&self.device);
        if device.core().is_activated() {
            return;
        }
        // The device gets its own copies; ours keep answering register reads.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let result = match queues {
            Ok(queues) => device.activate(self.mem.clone(), queues, self.irq.clone()),
            Err(e) => Err(super::ActivateError::Backend(format!(
                "bad queue state: {e}"
            ))),
        };
        if let Err(e) = result {
            guest_error!(
                "virtio-mmio: cannot activate device type {}: {e}",
                device.core().device_type()
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            let _ = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        let mut device = lock(&self.device);
        device.reset();
        self.queues = fresh_queues(&*device);
        drop(device);
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.irq.ack(u32::MAX);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!(
                "virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_u32(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                "virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_u32(offset, u32::from_le_bytes(bytes));
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .core()
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

/// Locks a device; a device mutex is only poisoned if a device method panicked, which is a VMM
/// bug, so continuing with the inner state is the most useful thing to do.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, DeviceCore, VIRTIO_F_VERSION_1};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct DummyDevice {
        core: DeviceCore,
        activations: usize,
        config: [u8; 8],
    }

    impl VirtioDevice for DummyDevice {
        fn core(&self) -> &DeviceCore {
            &self.core
        }
        fn core_mut(&mut self) -> &mut DeviceCore {
            &mut self.core
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let off = offset as usize;
            if let Some(src) = self.config.get(off..off + data.len()) {
                data.copy_from_slice(src);
            }
        }
        fn activated(&mut self) -> Result<(), ActivateError> {
            let queues = &self.core.active().unwrap().queues;
            if queues.iter().any(|q| !q.ready()) {
                return Err(ActivateError::InvalidQueue(0));
            }
            self.activations += 1;
            Ok(())
        }
    }

    impl DummyDevice {
        fn is_active(&self) -> bool {
            self.core.is_activated()
        }
        fn acked(&self) -> u64 {
            self.core.acked_features()
        }
        fn evts(&self) -> &[EventFd] {
            self.core.queue_events()
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(DummyDevice {
            core: DeviceCore::new("dummy", 4, VIRTIO_F_VERSION_1 | 1, &[16, 16]).unwrap(),
            activations: 0,
            config: *b"abcdefgh",
        }));
        (MmioTransport::new(mem, dev.clone()).unwrap(), dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1); // VERSION_1
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        w(t, reg::QUEUE_SEL, idx);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 4);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn config_space_reads_any_width() {
        let (mut t, _) = transport();
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(&b, b"cd");
        let mut b = [0xffu8; 4];
        t.read(reg::CONFIG + 100, &mut b);
        assert_eq!(b, [0; 4], "out-of-range config reads return zeroes");
    }

    #[test]
    fn full_negotiation_activates_once() {
        let (mut t, dev) = transport();
        negotiate(&mut t);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x4000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(dev.lock().unwrap().is_active());
        assert_eq!(dev.lock().unwrap().acked(), VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(dev.lock().unwrap().activations, 1);
        // Queue registers are frozen while running.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Reset returns everything to the initial state.
        w(&mut t, reg::STATUS, 0);
        assert!(!dev.lock().unwrap().is_active());
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn unoffered_features_refuse_features_ok() {
        let (mut t, _) = transport();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0x2); // not offered
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, dev) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1000); // queue 1 never made ready
        w(&mut t, reg::STATUS, 0xf);
        assert!(!dev.lock().unwrap().is_active());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut t, _) = transport();
        // Wrong width, unaligned, unknown register: ignored, no panic.
        t.write(reg::STATUS, &[1, 0]);
        t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        w(&mut t, 0xf0, 5);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        // Clearing status bits without a reset is refused.
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::STATUS, 1);
        assert_eq!(r(&mut t, reg::STATUS), 3);
        // Notify for a queue that does not exist.
        w(&mut t, reg::QUEUE_NOTIFY, 99);
    }

    #[test]
    fn notify_register_signals_queue_eventfd() {
        let (mut t, dev) = transport();
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(dev.lock().unwrap().evts()[1].read().unwrap(), 1);
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, _) = transport();
        t.irq().trigger(1).unwrap();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }
}
