//! virtio-rng: the guest's request chains through the device's queue processing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm_fuzz::{drive, DeviceInput, Input};
use vmm::devices::virtio::rng::Rng;

fuzz_target!(|data: &[u8]| {
    let input = DeviceInput::read(&mut Input(data));
    let mut dev = Rng::new().expect("rng device");
    drive(&mut dev, &input, |_, _| {});
});
