//! The ioctl request numbers the lists allow, computed from the kernel's encoding (direction,
//! type, number, argument size) as `kvm-ioctls` computes them, so they cannot drift from the
//! structures the calls take.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

const KVMIO: u32 = 0xAE;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);

/// `TUNSETOFFLOAD`: a tap's offloads follow what the guest driver accepted (set on activation
/// and reset).
pub const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
/// `FIONBIO`: `std`'s `set_nonblocking` on a socket (vsock host connections after `accept`).
pub const FIONBIO: u64 = libc::FIONBIO;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_kernel_headers() {
        // Values from include/uapi/linux/kvm.h and if_tun.h as the kernel computes them on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(FIONBIO, 0x5421);
    }
}
