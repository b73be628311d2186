//! Building and running a VM: the one walk from a [`VmConfig`] to the guest's exit.
//!
//! # Thread model
//!
//! - The calling thread becomes the **VMM event thread**: it runs the `event-manager` loop that
//!   serves virtio queues (woken by ioeventfds), vsock host sockets, and the exit signal.
//! - One **vCPU thread** per vCPU (`vcpuN`) runs `KVM_RUN` and handles port I/O and MMIO exits:
//!   legacy devices and virtio-mmio register accesses, under the device's mutex.
//!
//! No other threads exist. Each kind installs its own seccomp filter ([`crate::seccomp`]) before
//! it serves the guest. The event thread never blocks on guest-controlled work, and nothing
//! polls: every wakeup is an fd event.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use linux_loader::loader::Cmdline;
use tracing::{debug, info, warn};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{self, boot, cpuid, layout, mptable, regs};
use crate::devices::legacy::{
    BootMarker, ConsoleWriter, EventFdTrigger, SerialConsole, BOOT_MARKER_PORT, I8042, I8042_PORT,
    SERIAL_PORT,
};
use crate::devices::virtio::{
    block::Block, fs::Fs, net::Net, rng::Rng, vsock::Vsock, MmioTransport,
};
use crate::devices::virtio::{Subscriber as VirtioSubscriber, VirtioDevice, VirtioEvents};
use crate::devices::virtio::{MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::{lock, Bus};
use crate::seccomp::{self, SeccompMode, ThreadFilter, ThreadRole};
use crate::vcpu::{ExitSignal, Vcpu};

pub use vmm_api::{DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};

// The contract's limits are this VMM's: one IRQ line per virtio device, the MP table's CPUs,
// the virtio-fs config space's tag.
const _: () = assert!(vmm_api::MAX_VCPUS == mptable::MAX_CPUS);
const _: () = assert!(vmm_api::MAX_FS_TAG_BYTES == crate::devices::virtio::fs::TAG_MAX_LEN);
const _: () = assert!(
    vmm_api::MAX_VIRTIO_DEVICES == (layout::IRQ_MAX - layout::VIRTIO_IRQ_FIRST + 1) as usize
);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("KVM ioctl failed: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(#[from] vmm_api::ConfigError),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Memory {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error("network device on tap {tap}: {source}")]
    Net {
        tap: String,
        source: crate::devices::virtio::net::NetError,
    },
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    #[error("too many devices: IRQ lines {first} to {max} are all taken")]
    TooManyDevices { first: u32, max: u32 },
    #[error("event manager: {0}")]
    EventManager(#[from] event_manager::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{0}")]
    Confine(ConfineError),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Boots the VM described by `config`, with its serial console writing to `console`, and
/// serves it until the guest resets or fails. Returns the VMM's exit code: 0 when the guest
/// reset the machine, 1 on a VM error.
pub fn run(config: VmConfig, console: Box<dyn Write + Send>) -> Result<i32, VmmError> {
    run_confined(config, console, || Ok(()))
}

/// What [`run_confined`]'s `confine` may fail with.
pub type ConfineError = Box<dyn std::error::Error + Send + Sync>;

/// [`run`], calling `confine` once everything the VM needs from the host is open (KVM, guest
/// memory, devices, kernel) and before the guest's first instruction or any other thread: where
/// the jail drops the VMM's privileges (capabilities are per thread) and before any seccomp
/// filter.
pub fn run_confined(
    config: VmConfig,
    console: Box<dyn Write + Send>,
    confine: impl FnOnce() -> Result<(), ConfineError>,
) -> Result<i32, VmmError> {
    validate(&config)?;
    if !config.force {
        crate::host::check_can_boot_guests()?;
    }
    let kvm = Kvm::new()?;
    crate::host::check_capabilities(&kvm)?;
    let vm = kvm.create_vm()?;
    let mem = create_memory(&vm, config.memory_mib, !config.fs.is_empty())?;
    phase("VM and guest memory created");
    // The TSS lives in the three pages below the BIOS ROM area, outside guest RAM.
    vm.set_tss_address(0xfffb_d000)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;

    let exit = Arc::new(ExitSignal::new()?);
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut subscribers: Vec<Subscriber> = vec![Arc::new(Mutex::new(ExitWatcher(exit.clone())))];

    // Legacy devices.
    let serial_irq = EventFd::new(EFD_NONBLOCK)?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        EventFdTrigger(serial_irq),
        ConsoleWriter::new(console),
    )));
    insert(&mut pio, serial.clone(), SERIAL_PORT, 8)?;
    let reset_evt = EventFd::new(EFD_NONBLOCK)?;
    subscribers.push(Arc::new(Mutex::new(ResetWatcher {
        evt: reset_evt.try_clone()?,
        exit: exit.clone(),
    })));
    insert(
        &mut pio,
        Arc::new(Mutex::new(I8042::new(EventFdTrigger(reset_evt)))),
        I8042_PORT,
        5,
    )?;
    insert(
        &mut pio,
        Arc::new(Mutex::new(BootMarker::default())),
        BOOT_MARKER_PORT,
        1,
    )?;
    phase("legacy devices");

    // Virtio devices, in a fixed order so guest device names are stable: disks (vda, vdb, ...),
    // then vsock, then rng, then network devices (eth0, eth1, ...), then virtio-fs.
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(VmmError::Cmdline)?;
    cmdline
        .insert_str(config.cmdline.render())
        .map_err(VmmError::Cmdline)?;
    let mut virtio = VirtioAttacher {
        vm: &vm,
        mem: &mem,
        mmio: &mut mmio,
        cmdline: &mut cmdline,
        subscribers: &mut subscribers,
        next: 0,
    };
    for disk in &config.disks {
        let mut block = Block::new(&disk.path, disk.read_only)?;
        if let Some(limit) = &disk.rate_limit {
            block = block.with_rate_limit(limit)?;
        }
        virtio.attach(Arc::new(Mutex::new(block)))?;
    }
    if let Some(vsock) = &config.vsock {
        virtio.attach(Arc::new(Mutex::new(Vsock::new(
            vsock.guest_cid,
            &vsock.uds_path,
        )?)))?;
    }
    if config.rng {
        virtio.attach(Arc::new(Mutex::new(Rng::new()?)))?;
    }
    for net in &config.nets {
        let dev = Net::new(&net.tap_name, net.mac, net.mtu).map_err(|source| VmmError::Net {
            tap: net.tap_name.clone(),
            source,
        })?;
        virtio.attach(Arc::new(Mutex::new(dev)))?;
    }
    for fs in &config.fs {
        virtio.attach(Arc::new(Mutex::new(Fs::new(&fs.tag, &fs.socket)?)))?;
    }

    phase("virtio devices");
    // Kernel, initrd, command line, boot structures.
    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    phase("kernel loaded");
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(
            &mem,
            path,
            kernel.end,
            boot::initrd_addr_max(&kernel),
        )?),
        None => None,
    };
    let cmdline_len = boot::write_cmdline(&mem, &cmdline)?;
    let map = arch::memory_map(config.memory_mib << 20);
    match kernel.entry {
        regs::BootEntry::Pvh(_) => boot::write_pvh_start_info(&mem, &map, initrd)?,
        regs::BootEntry::Linux64(_) => {
            boot::write_boot_params(&mem, &kernel, &map, cmdline_len, initrd)?
        }
    }
    mptable::setup_mptable(&mem, config.vcpus)?;
    phase("initrd and boot structures");
    debug!(
        "kernel entry {:?}, command line {:?}",
        kernel.entry,
        cmdline.as_cstring()
    );

    // vCPUs.
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let fd = vm.create_vcpu(u64::from(index))?;
        let timers = cpuid::HostTimers::probe(&kvm, &fd);
        fd.set_cpuid2(&cpuid::for_vcpu(
            &supported_cpuid,
            index,
            config.vcpus,
            timers,
        ))?;
        regs::setup_lapic(&fd)?;
        regs::setup_fpu(&fd)?;
        if index == 0 {
            let sregs = regs::boot_sregs(&mem, kernel.entry, fd.get_sregs()?)?;
            fd.set_sregs(&sregs)?;
            fd.set_regs(&regs::boot_regs(kernel.entry))?;
        }
        vcpus.push(Vcpu::new(
            index,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
        ));
    }

    phase("vCPUs configured");
    confine().map_err(VmmError::Confine)?;
    phase("confined");

    // The event thread's loop, then the vCPUs, each thread confined before it serves the guest.
    let mut events = EventManager::<Subscriber>::new()?;
    for s in subscribers {
        events.add_subscriber(s);
    }
    install_kick_handler()?;
    let devices = seccomp::DeviceSet::of(&config);
    let vcpu_filter = ThreadFilter::new(ThreadRole::Vcpu, devices, config.seccomp)?;
    let event_filter = ThreadFilter::new(ThreadRole::EventLoop, devices, config.seccomp)?;
    match config.seccomp {
        SeccompMode::Enforce => {}
        SeccompMode::Log => warn!("seccomp: calls outside the filters are logged, not refused"),
        SeccompMode::Off => warn!("seccomp: the VMM's threads are not confined"),
    }
    let handles = vcpus
        .into_iter()
        .map(|vcpu| {
            let filter = vcpu_filter.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || vcpu.run_confined(&filter))
        })
        .collect::<Result<Vec<_>, _>>()?;
    info!(
        "VM running: {} vCPUs, {} MiB, setup took {:.3} ms since VMM start",
        config.vcpus,
        config.memory_mib,
        crate::timing::since_start().as_secs_f64() * 1000.0
    );

    let code = match event_filter.install() {
        Ok(()) => loop {
            events.run()?;
            if let Some(code) = exit.code() {
                break code;
            }
        },
        Err(e) => {
            exit.report(crate::vcpu::VmExit::Error(e.to_string()));
            exit.code().unwrap_or(1)
        }
    };
    stop_vcpus(handles);
    lock(&serial).flush();
    drop(mem);
    Ok(code)
}

/// A debug line with the time since VMM start, to see where setup time goes.
fn phase(name: &str) {
    debug!(
        "{name} at {:.3} ms",
        crate::timing::since_start().as_secs_f64() * 1000.0
    );
}

/// The contract's own checks, then what only this host can tell: its memory, and whether the
/// kernel and initrd are there (so a typo costs no VM setup).
fn validate(config: &VmConfig) -> Result<(), VmmError> {
    config.validate()?;
    let host_max = host_memory_mib();
    if config.memory_mib > host_max {
        return Err(VmmError::Config(format!(
            "memory_mib {} is more than this host has ({host_max} MiB)",
            config.memory_mib
        )));
    }
    let files = std::iter::once(("kernel", &config.kernel))
        .chain(config.initrd.iter().map(|initrd| ("initrd", initrd)));
    for (what, path) in files {
        if !path.is_file() {
            return Err(VmmError::Config(format!(
                "{what} {} does not exist or is not a file",
                path.display()
            )));
        }
    }
    Ok(())
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb / 1024)
}

/// Allocates guest RAM (not reserved: untouched pages cost nothing) and registers it with KVM.
/// Anonymous and private unless `shared`: then one memfd mapped shared, which a vhost-user
/// daemon can map too (it gets the fd and each region's offset in it).
fn create_memory(vm: &VmFd, mib: u64, shared: bool) -> Result<GuestMemoryMmap, VmmError> {
    let ranges = arch::ram_ranges(mib << 20);
    let mem = if shared {
        let file = Arc::new(memfd("guest-ram", mib << 20)?);
        let mut offset = 0u64;
        let with_files: Vec<_> = ranges
            .iter()
            .map(|&(addr, len)| {
                let r = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
                offset += len as u64;
                r
            })
            .collect();
        GuestMemoryMmap::from_ranges_with_files(with_files)
    } else {
        GuestMemoryMmap::from_ranges(&ranges)
    }
    .map_err(|source| VmmError::Memory { mib, source })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmmError::Config(format!("guest memory region: {e}")))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM's use of
        // it: `run` keeps `mem` until after the vCPU threads have stopped.
        unsafe { vm.set_user_memory_region(region)? };
        // Huge pages where the host allows them: loading a 10 MiB kernel then costs a handful
        // of page faults instead of thousands, and the guest's TLB misses get cheaper. Where
        // THP is off this is a no-op, so its result only gets a debug line.
        // SAFETY: madvise on a range inside a mapping we own; it changes no memory contents.
        let r = unsafe {
            libc::madvise(
                host.cast(),
                region.memory_size as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
        }
    }
    Ok(mem)
}

/// A memfd of `len` bytes (sparse: pages are allocated when touched).
fn memfd(name: &str, len: u64) -> Result<std::fs::File, VmmError> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(|e| VmmError::Config(e.to_string()))?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is checked and
    // owned by the File from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

fn insert(
    bus: &mut Bus,
    dev: Arc<Mutex<dyn crate::devices::BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), VmmError> {
    bus.insert(dev, base, len)
        .map_err(|e| VmmError::Config(format!("device layout: {e}")))
}

/// Attaches virtio devices: an MMIO window, an IRQ line (irqfd), one ioeventfd per queue, an
/// entry on the guest command line, and the device's event handler.
struct VirtioAttacher<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    cmdline: &'a mut Cmdline,
    subscribers: &'a mut Vec<Subscriber>,
    next: u32,
}

impl VirtioAttacher<'_> {
    fn attach<D>(&mut self, device: Arc<Mutex<D>>) -> Result<(), VmmError>
    where
        D: VirtioDevice + VirtioEvents + 'static,
    {
        let irq = layout::VIRTIO_IRQ_FIRST + self.next;
        if irq > layout::IRQ_MAX {
            return Err(VmmError::TooManyDevices {
                first: layout::VIRTIO_IRQ_FIRST,
                max: layout::IRQ_MAX,
            });
        }
        let base = layout::VIRTIO_MMIO_START + u64::from(self.next) * MMIO_WINDOW_SIZE;
        self.next += 1;
        let transport = MmioTransport::new(self.mem.clone(), device.clone())?;
        self.vm.register_irqfd(transport.irq().eventfd(), irq)?;
        for (i, evt) in lock(&device).core().queue_events().iter().enumerate() {
            self.vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                i as u32,
            )?;
        }
        insert(
            self.mmio,
            Arc::new(Mutex::new(transport)),
            base,
            MMIO_WINDOW_SIZE,
        )?;
        self.cmdline
            .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)
            .map_err(VmmError::Cmdline)?;
        self.subscribers
            .push(Arc::new(Mutex::new(VirtioSubscriber(device))));
        Ok(())
    }
}

/// Wakes the event loop when a vCPU reports the VM's end.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            warn!("cannot watch the exit event: {e}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
}

/// Turns the i8042 reset line into the VM's clean end.
struct ResetWatcher {
    evt: EventFd,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ResetWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            warn!("cannot watch the reset line: {e}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        info!("guest reset the VM");
        self.exit.report(crate::vcpu::VmExit::GuestReset);
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A no-op handler for the signal that interrupts `KVM_RUN` (it returns EINTR).
fn install_kick_handler() -> Result<(), VmmError> {
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| VmmError::Io(std::io::Error::from_raw_os_error(e.errno())))
}

/// Interrupts every vCPU thread until it has left its loop, then joins it.
fn stop_vcpus(handles: Vec<JoinHandle<()>>) {
    for handle in handles {
        for _ in 0..1000 {
            if handle.is_finished() {
                break;
            }
            let _ = handle.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(1));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            warn!("a vCPU thread did not stop within a second");
        }
    }
}
