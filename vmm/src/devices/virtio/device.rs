//! The one shape every virtio device has (Firecracker's `VirtioDevice`): a [`DeviceCore`] that
//! holds what the virtio specification gives every device (offered and accepted features, the
//! queues and their notification eventfds, the interrupt line, the activation state) and the
//! queue-serving loop, and two small traits a device implements:
//!
//! * [`VirtioDevice`] (in each device's `device.rs`): its configuration space and what it does
//!   when activated or reset. The MMIO transport drives it from vCPU threads.
//! * [`VirtioEvents`] (in each device's `event_handler.rs`): what it does when the guest notifies
//!   a queue or a host-side fd of the device becomes ready. [`Subscriber`] turns any device into
//!   the event manager's subscriber, so no device registers eventfds by hand.
//!
//! A new device is therefore its state, a configuration space, and `queue_notified`.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::error;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::lock;
use super::VIRTIO_MMIO_INT_VRING;

/// A device's interrupt line: the `InterruptStatus` register, shared by the transport (which the
/// guest reads and acknowledges through) and the device (which raises it), plus the eventfd that
/// KVM turns into a guest interrupt (irqfd), so raising it costs one `write(2)` and no VM exit.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in `InterruptStatus` and injects the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The current `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest's `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("queue {0} is not valid (bad size or addresses outside guest memory)")]
    InvalidQueue(usize),
    #[error("the driver did not accept a feature the device requires: {0}")]
    MissingFeature(&'static str),
    #[error("device backend failed: {0}")]
    Backend(String),
}

/// What an activated device works with: guest memory, the driver's queues, the interrupt line.
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    irq: Arc<IrqTrigger>,
}

impl ActiveQueues {
    /// The interrupt line, for a device whose used buffers are returned by someone else (a
    /// vhost-user daemon) and who only relays the notification.
    pub fn irq(&self) -> &IrqTrigger {
        &self.irq
    }
}

/// The state every virtio device has; see the module documentation.
pub struct DeviceCore {
    /// For log lines: `virtio-blk`, `vsock`, ...
    name: &'static str,
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: &'static [u16],
    /// One per queue, signalled by KVM when the guest writes the queue's index to `QueueNotify`
    /// (an ioeventfd). Created with the device, so activation re-registers nothing.
    queue_evts: Vec<EventFd>,
    active: Option<ActiveQueues>,
}

impl DeviceCore {
    /// A device of type `device_type` offering `avail_features`, with one queue per entry of
    /// `queue_max_sizes` (each a power of two).
    pub fn new(
        name: &'static str,
        device_type: u32,
        avail_features: u64,
        queue_max_sizes: &'static [u16],
    ) -> std::io::Result<Self> {
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name,
            device_type,
            avail_features,
            acked_features: 0,
            queue_max_sizes,
            queue_evts,
            active: None,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The virtio device id ([`super::device_type`]).
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The maximum size of each queue; its length is the number of queues.
    pub fn queue_max_sizes(&self) -> &'static [u16] {
        self.queue_max_sizes
    }

    /// Feature bits the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Feature bits the driver accepted (always a subset of the offered ones).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver accepted every bit of `features`.
    pub fn has_features(&self, features: u64) -> bool {
        self.acked_features & features == features
    }

    /// Records the features the driver accepted; bits the device did not offer are dropped.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// One eventfd per queue, signalled when the guest notifies that queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    pub fn active(&self) -> Option<&ActiveQueues> {
        self.active.as_ref()
    }

    pub fn active_mut(&mut self) -> Option<&mut ActiveQueues> {
        self.active.as_mut()
    }

    /// Takes the driver's queues: exactly one per queue of the device, each valid in `mem`;
    /// event-index notification is on for all of them when the driver accepted it.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        let want = self.queue_max_sizes.len();
        if queues.len() != want {
            return Err(ActivateError::QueueCount {
                want,
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().position(|q| !q.is_valid(&mem)) {
            return Err(ActivateError::InvalidQueue(i));
        }
        let event_idx = self.has_features(1 << VIRTIO_RING_F_EVENT_IDX);
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        self.active = Some(ActiveQueues { mem, queues, irq });
        Ok(())
    }

    /// Serves the available chains of queue `index`: each is popped and handed to `serve`, which
    /// returns its used length as `Continue(len)` to go on, or `Break(len)` to stop after it.
    /// Returns whether any chain went back to the guest; the caller interrupts it (see
    /// [`DeviceCore::signal_used`]) when it has finished its round.
    ///
    /// Notifications stay off while we work and are re-enabled before returning, with a last look
    /// for chains that arrived meanwhile (virtio 2.7.10). A round serves at most one queue's worth
    /// of chains; if the guest keeps adding more, the queue's own eventfd is signalled so that the
    /// event loop serves every other device before it comes back here: a flooding guest slows
    /// only its own queue.
    pub fn process_chains<F>(&mut self, index: usize, mut serve: F) -> bool
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> ControlFlow<u32, u32>,
    {
        self.process_or_defer(index, |mem, chain| match serve(mem, chain) {
            ControlFlow::Continue(len) => Served::Used(len),
            ControlFlow::Break(len) => Served::UsedLast(len),
        })
    }

    /// [`DeviceCore::serve_queue`] for a device that may also decline a chain for now (a rate
    /// limit): `None` leaves that chain on the available ring, untouched, and ends the round;
    /// the device serves the queue again when it can.
    pub fn serve_queue_or_defer<F>(&mut self, index: usize, mut serve: F)
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
    {
        let used = self.process_or_defer(index, |mem, chain| match serve(mem, chain) {
            Some(len) => Served::Used(len),
            None => Served::Deferred,
        });
        if used {
            self.signal_used([index]);
        }
    }

    fn process_or_defer<F>(&mut self, index: usize, mut serve: F) -> bool
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Served,
    {
        let name = self.name;
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return false;
        };
        let mem = &active.mem;
        let mut budget = usize::from(queue.size().max(1));
        let mut used_any = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                guest_error!("{name}: queue {index}: cannot disable notifications: {e}");
                return used_any;
            }
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                let (len, stop) = match serve(mem, chain) {
                    Served::Used(len) => (len, false),
                    Served::UsedLast(len) => (len, true),
                    Served::Deferred => {
                        queue.go_to_previous_position();
                        let _ = queue.enable_notification(mem);
                        return used_any;
                    }
                };
                match queue.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => guest_warn!("{name}: cannot return descriptor {head}: {e}"),
                }
                budget -= 1;
                if stop || budget == 0 {
                    let _ = queue.enable_notification(mem);
                    if budget == 0 && !stop {
                        // More may be waiting: come back after the other devices had a turn.
                        let _ = self.queue_evts[index].write(1);
                    }
                    return used_any;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) if popped => {}
                // Chains announced but none could be popped: a corrupt available ring, which
                // would otherwise keep this loop spinning.
                Ok(true) => {
                    guest_warn!("{name}: queue {index}: available ring index is corrupt");
                    return used_any;
                }
                Ok(false) => return used_any,
                Err(e) => {
                    guest_error!("{name}: queue {index}: cannot enable notifications: {e}");
                    return used_any;
                }
            }
        }
    }

    /// [`DeviceCore::process_chains`], then the interrupt if the guest wants one.
    pub fn serve_queue<F>(&mut self, index: usize, serve: F)
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> ControlFlow<u32, u32>,
    {
        if self.process_chains(index, serve) {
            self.signal_used([index]);
        }
    }

    /// Interrupts the guest once if any of `queues` (which had chains returned) needs it (with
    /// event-index notification the driver says when it wants to hear).
    pub fn signal_used(&mut self, queues: impl IntoIterator<Item = usize>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut needed = false;
        for index in queues {
            if let Some(q) = active.queues.get_mut(index) {
                needed |= q.needs_notification(&active.mem).unwrap_or(true);
            }
        }
        if needed {
            if let Err(e) = active.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("{}: cannot interrupt the guest: {e}", self.name);
            }
        }
    }

    /// Registers the queue eventfds with the event manager; each reports its queue index as data.
    fn register_queue_events(&self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error!("{}: cannot register queue {i} event: {e}", self.name);
            }
        }
    }

    /// If `events` is a queue notification: drains that eventfd (so a notification arriving while
    /// the device works is kept) and returns the queue index.
    fn take_queue_event(&self, events: &Events) -> Option<usize> {
        let index = events.data() as usize;
        let evt = self.queue_evts.get(index)?;
        if events.fd() != std::os::fd::AsRawFd::as_raw_fd(evt) {
            return None;
        }
        let _ = evt.read();
        Some(index)
    }
}

/// What a device did with one chain in [`DeviceCore::process_or_defer`].
enum Served {
    /// Returned with this used length; go on.
    Used(u32),
    /// Returned with this used length; the round ends.
    UsedLast(u32),
    /// Not served: back on the available ring, and the round ends.
    Deferred,
}

/// What the transport needs from a device beyond its [`DeviceCore`]. The device keeps its own
/// queue-notification eventfds (in the core), registered with KVM as ioeventfds by the VM and
/// with the event manager by [`Subscriber`], so activation needs no event re-registration across
/// threads.
pub trait VirtioDevice: Send {
    fn core(&self) -> &DeviceCore;
    fn core_mut(&mut self) -> &mut DeviceCore;

    /// Reads the device-specific configuration space at `offset`. Out-of-range reads leave
    /// `data` untouched (zeroes, as the transport hands over a zeroed buffer).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = (offset, data);
    }

    /// Writes the device-specific configuration space. The default is a read-only one.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!(
            "{}: config write at {offset:#x} ignored (read-only config space)",
            self.core().name()
        );
    }

    /// Called once the core holds the driver's queues: set up the backend and serve what the
    /// driver queued before `DRIVER_OK`. An error undoes the activation.
    fn activated(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }

    /// Called when the driver resets the device, before the core drops the queues.
    fn resetting(&mut self) {}

    /// Takes the driver-configured queues and starts serving them.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        self.core_mut().activate(mem, queues, irq)?;
        if let Err(e) = self.activated() {
            self.core_mut().active = None;
            return Err(e);
        }
        Ok(())
    }

    /// Drops the queues and returns to the pre-activation state (driver wrote status 0).
    fn reset(&mut self) {
        if self.core().is_activated() {
            self.resetting();
        }
        self.core_mut().active = None;
    }
}

/// The event-thread half of a device.
pub trait VirtioEvents {
    /// Whether the VMM serves the queues itself. A vhost-user device answers false: its queue
    /// eventfds are the daemon's kicks, which the event loop must not drain.
    fn serves_queues(&self) -> bool {
        true
    }

    /// The guest notified queue `index` (its eventfd is already drained).
    fn queue_notified(&mut self, index: usize);

    /// Host-side fds to watch besides the queue eventfds. Their data must not be a queue index.
    fn backend_events(&self) -> Vec<Events> {
        Vec::new()
    }

    /// One of [`VirtioEvents::backend_events`] is ready.
    fn backend_ready(&mut self, events: Events) {
        let _ = events;
    }
}

/// Any virtio device as an event-manager subscriber: queue notifications go to
/// [`VirtioEvents::queue_notified`], everything else to [`VirtioEvents::backend_ready`].
pub struct Subscriber<D>(pub Arc<Mutex<D>>);

impl<D: VirtioDevice + VirtioEvents> MutEventSubscriber for Subscriber<D> {
    fn init(&mut self, ops: &mut EventOps) {
        let device = lock(&self.0);
        if device.serves_queues() {
            device.core().register_queue_events(ops);
        }
        for events in device.backend_events() {
            if let Err(e) = ops.add(events) {
                error!(
                    "{}: cannot register a host-side fd: {e}",
                    device.core().name()
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut device = lock(&self.0);
        match device.core().take_queue_event(&events) {
            Some(index) => device.queue_notified(index),
            None => device.backend_ready(events),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const QSIZE: u16 = 8;
    /// The mock's used ring overlaps its avail ring; ours is placed by hand.
    const USED_RING: u64 = 0x1000;

    /// A core on a queue of `QSIZE` single-descriptor chains (heads 0..QSIZE all available).
    fn core_with_full_queue(
        mem: &GuestMemoryMmap,
    ) -> (DeviceCore, MockSplitQueue<'_, GuestMemoryMmap>) {
        let vq = MockSplitQueue::new(mem, QSIZE);
        for i in 0..QSIZE {
            let desc = Descriptor::new(0x2000 + u64::from(i) * 16, 16, 0, 0);
            vq.desc_table().store(i, RawDescriptor::from(desc)).unwrap();
            vq.avail().ring().ref_at(i as usize).unwrap().store(i);
        }
        vq.avail().idx().store(QSIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        let mut core = DeviceCore::new("test", 4, 0, &[QSIZE]).unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        core.activate(mem.clone(), vec![queue], irq).unwrap();
        (core, vq)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn a_flooding_guest_gets_one_queue_size_per_round_and_a_requeue() {
        let mem = mem();
        let (mut core, vq) = core_with_full_queue(&mem);
        let mut served = 0u32;
        // The "guest" makes every chain available again as soon as it is served: without a
        // budget the device would serve it forever (the panic stops such a loop).
        let used = core.process_chains(0, |_, chain| {
            served += 1;
            assert!(served <= 100, "the round never ends");
            let avail = vq.avail().idx().load();
            let slot = usize::from(avail % QSIZE);
            vq.avail()
                .ring()
                .ref_at(slot)
                .unwrap()
                .store(chain.head_index());
            vq.avail().idx().store(avail.wrapping_add(1));
            ControlFlow::Continue(0)
        });
        assert!(used);
        assert_eq!(served, u32::from(QSIZE));
        // The queue's own eventfd brings the event loop back after the other devices.
        assert_eq!(core.queue_events()[0].read().unwrap(), 1);
        // The next round serves the rest, again at most a queue's worth.
        let mut next = 0;
        core.process_chains(0, |_, _| {
            next += 1;
            ControlFlow::Continue(0)
        });
        assert_eq!(next, QSIZE);
    }

    #[test]
    fn break_returns_the_chain_and_stops() {
        let mem = mem();
        let (mut core, _vq) = core_with_full_queue(&mem);
        let mut served = 0;
        core.process_chains(0, |_, _| {
            served += 1;
            if served == 2 {
                ControlFlow::Break(7)
            } else {
                ControlFlow::Continue(1)
            }
        });
        assert_eq!(served, 2);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        assert_eq!(used_idx, 2, "both chains went back");
        let second_len: u32 = mem.read_obj(GuestAddress(USED_RING + 4 + 8 + 4)).unwrap();
        assert_eq!(second_len, 7);
        assert!(
            core.queue_events()[0].read().is_err(),
            "no requeue after Break"
        );
    }

    #[test]
    fn activation_wants_every_queue_valid() {
        let mem = mem();
        let mut core = DeviceCore::new("test", 4, 0, &[QSIZE, QSIZE]).unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let one = vec![vq.create_queue::<Queue>().unwrap()];
        let err = core.activate(mem.clone(), one, irq.clone()).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { want: 2, got: 1 }));
        let not_ready = Queue::new(QSIZE).unwrap();
        let queues = vec![vq.create_queue::<Queue>().unwrap(), not_ready];
        let err = core.activate(mem.clone(), queues, irq).unwrap_err();
        assert!(matches!(err, ActivateError::InvalidQueue(1)));
        assert!(!core.is_activated());
    }

    #[test]
    fn unoffered_features_are_never_acked() {
        let mut core = DeviceCore::new("test", 4, 0b101, &[QSIZE]).unwrap();
        core.set_acked_features(0b111);
        assert_eq!(core.acked_features(), 0b101);
        assert!(core.has_features(0b100));
        assert!(!core.has_features(0b110));
    }
}
