//! microvm's virtual machine monitor: a KVM VMM on the rust-vmm crates.
//!
//! The path through the code, in the order a VM is built (see [`vm::run`]):
//! [`host`] (can guests boot here?) → [`arch`] (memory layout, kernel loading, boot structures,
//! vCPU registers) → [`devices`] (legacy devices on port I/O, virtio devices on virtio-mmio) →
//! [`vcpu`] (one thread per vCPU) and the event loop in [`vm`] (one thread for all devices).
//!
//! The configuration arrives as a [`vmm_api::VmConfig`]; the `microvm-vmm` binary reads it
//! from a descriptor or a file and calls [`run`].

pub mod arch;
pub mod devices;
pub mod host;
pub mod seccomp;
pub mod timing;
pub mod vcpu;
pub mod vm;

pub use vm::{
    run, run_confined, ConfineError, DiskConfig, FsConfig, NetConfig, VmConfig, VmmError,
    VsockConfig,
};
/// The VM configuration's types and limits: the contract this VMM is started with.
pub use vmm_api;
