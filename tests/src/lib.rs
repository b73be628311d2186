//! Helpers for tests that boot real guests: an initramfs builder, a guest runner, and the
//! relay into the testbed for hosts whose KVM cannot boot guests.

pub mod guest;
pub mod proc_status;
pub use initramfs;
