//! virtio-vsock with its real host side: the guest's packets (requests, data, credit updates,
//! shutdowns, resets, in any order) through the device's tx/rx processing and the muxer, with a
//! host service listening on port 1024 so guest connections really open Unix streams. Every
//! stream is closed again when the device is dropped.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use microvm_fuzz::{drive, DeviceInput, Input};
use vmm::devices::virtio::vsock::Vsock;
use vmm::devices::virtio::VirtioDevice;

struct Host {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    service: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let uds = dir.path().join("v.sock");
        let service = UnixListener::bind(dir.path().join("v.sock_1024")).expect("bind");
        service.set_nonblocking(true).expect("nonblocking");
        Host {
            _dir: dir,
            uds,
            service,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let input = DeviceInput::read(&mut Input(data));
    let host = host();
    let mut accepted = Vec::new();
    {
        let mut dev = Vsock::new(3, &host.uds).expect("vsock device");
        drive(&mut dev, &input, |_, _| {
            // The host service answers: accept what the guest opened and greet it, so the
            // device has host data to move to the guest on the next round.
            while let Ok((mut s, _)) = host.service.accept() {
                let _ = std::io::Write::write_all(&mut s, b"hello from the host\n");
                s.set_nonblocking(true).ok();
                accepted.push(s);
            }
        });
        dev.reset();
    }
    // Connections the device opened after the last step.
    while host.service.accept().is_ok() {}
});
