//! One vCPU thread: a small state machine around `KVM_RUN`.
//!
//! `Running` handles exits (port I/O and MMIO go to the buses, everything else ends the VM)
//! until the VM is told to stop; then the thread parks in `Exited`. The outcome of the first
//! vCPU to end the VM is what the VMM exits with.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, error, info};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::rate_limit::guest_warn;
use crate::devices::Bus;
use crate::seccomp::ThreadFilter;

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset, or a KVM reset/shutdown system event).
    GuestReset,
    /// Something went wrong; the message says what.
    Error(String),
}

impl VmExit {
    pub fn code(&self) -> i32 {
        match self {
            VmExit::GuestReset => 0,
            VmExit::Error(_) => 1,
        }
    }
}

/// Shared by every thread: the first [`VmExit`] reported wins, and the event thread is woken.
pub struct ExitSignal {
    code: AtomicI32,
    evt: EventFd,
    stopping: AtomicBool,
}

const NO_EXIT: i32 = -1;

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            code: AtomicI32::new(NO_EXIT),
            evt: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
        })
    }

    pub fn report(&self, exit: VmExit) {
        let first = self
            .code
            .compare_exchange(NO_EXIT, exit.code(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        // Only the exit that ends the VM gets its error line: every vCPU may fail the same way
        // once the guest is gone, and those lines would say nothing new.
        if let VmExit::Error(msg) = &exit {
            if first {
                error!("{msg}");
            } else {
                debug!("{msg}");
            }
        }
        if first {
            self.stopping.store(true, Ordering::SeqCst);
            let _ = self.evt.write(1);
        }
    }

    /// The exit code, once some thread reported an exit.
    pub fn code(&self) -> Option<i32> {
        match self.code.load(Ordering::SeqCst) {
            NO_EXIT => None,
            c => Some(c),
        }
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

enum State {
    Running,
    Exited,
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
            exit,
        }
    }

    /// Confines this thread with `filter`, then runs the vCPU until the VM ends. A filter that
    /// cannot be installed ends the VM before the vCPU runs.
    pub fn run_confined(self, filter: &ThreadFilter) {
        if let Err(e) = filter.install() {
            self.exit
                .report(VmExit::Error(format!("vcpu{}: {e}", self.index)));
            return;
        }
        self.run();
    }

    /// Runs the vCPU until the VM ends.
    pub fn run(mut self) {
        let mut state = State::Running;
        let mut first_run = self.index == 0;
        loop {
            state = match state {
                State::Running => {
                    if first_run {
                        first_run = false;
                        info!(
                            target: "boot_marker",
                            "first KVM_RUN at {:.3} ms",
                            crate::timing::since_start().as_secs_f64() * 1000.0
                        );
                    }
                    self.run_once()
                }
                State::Exited => return,
            };
            if self.exit.stopping() {
                return;
            }
        }
    }

    /// The registers that say where a guest died, for the one-line error.
    fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    fn run_once(&mut self) -> State {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return State::Running;
            }
            Err(e) => {
                self.exit.report(VmExit::Error(format!(
                    "vcpu{}: KVM_RUN failed: {e}",
                    self.index
                )));
                return State::Exited;
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    // Unclaimed ports read as all ones, like an empty ISA bus.
                    data.fill(0xff);
                }
                State::Running
            }
            VcpuExit::IoOut(port, data) => {
                // Unclaimed port writes (POST code 0x80, probes of absent devices) are dropped.
                self.pio.write(u64::from(port), data);
                State::Running
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    guest_warn!("vcpu{}: MMIO read of unmapped {addr:#x}", self.index);
                    data.fill(0xff);
                }
                State::Running
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    guest_warn!("vcpu{}: MMIO write to unmapped {addr:#x}", self.index);
                }
                State::Running
            }
            VcpuExit::Hlt => State::Running,
            VcpuExit::SystemEvent(kind, _) => {
                use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
                if kind == KVM_SYSTEM_EVENT_RESET || kind == KVM_SYSTEM_EVENT_SHUTDOWN {
                    self.exit.report(VmExit::GuestReset);
                } else {
                    self.exit.report(VmExit::Error(format!(
                        "vcpu{}: unexpected system event {kind}",
                        self.index
                    )));
                }
                State::Exited
            }
            VcpuExit::Shutdown => {
                let state = self.describe_state();
                self.exit.report(VmExit::Error(format!(
                    "vcpu{}: the guest triple-faulted (KVM_EXIT_SHUTDOWN; {state}); boot the \
                     guest with reboot=k to reset cleanly",
                    self.index
                )));
                State::Exited
            }
            VcpuExit::FailEntry(reason, cpu) => {
                self.exit.report(VmExit::Error(format!(
                    "vcpu{}: KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}",
                    self.index
                )));
                State::Exited
            }
            VcpuExit::InternalError => {
                self.exit.report(VmExit::Error(format!(
                    "vcpu{}: KVM internal error (the host's KVM could not run a guest \
                     instruction)",
                    self.index
                )));
                State::Exited
            }
            other => {
                self.exit.report(VmExit::Error(format!(
                    "vcpu{}: unhandled exit {other:?}",
                    self.index
                )));
                State::Exited
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.code(), None);
        s.report(VmExit::GuestReset);
        s.report(VmExit::Error("late".into()));
        assert_eq!(s.code(), Some(0));
        assert_eq!(s.eventfd().read().unwrap(), 1);
        let s = ExitSignal::new().unwrap();
        s.report(VmExit::Error("boom".into()));
        assert_eq!(s.code(), Some(1));
    }
}
