//! A vCPU thread (`vcpuN`): `KVM_RUN` and the exits it serves itself, port I/O and MMIO on the
//! two buses. What a device does when the guest activates or resets it through an MMIO write
//! (start its backend, serve requests queued before `DRIVER_OK`) also runs here: that part
//! comes from [`super::devices`].

use seccompiler::BackendError;

use super::ioctls::{KVM_GET_REGS, KVM_GET_SREGS, KVM_RUN};
use super::rules::{ioctls, SyscallList};

pub fn vcpu() -> Result<SyscallList, BackendError> {
    Ok(SyscallList::new().allow_when(
        libc::SYS_ioctl,
        // KVM_RUN, and the registers that say where a dying guest was for its one-line error.
        ioctls(&[KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()])?,
    ))
}
