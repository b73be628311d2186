//! virtio-net against a real tap, in a network namespace of the fuzzer's own (created once, so
//! nothing reaches the host's network): the guest's TX chains go through the device to the tap
//! and into that namespace's kernel stack; frames the fuzzer injects on the tap's host side
//! (an `AF_PACKET` socket) go through the device into the guest's RX chains. One device serves
//! every input: it is reset after each, as a guest driver resets it.
#![no_main]

use std::process::Command;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use microvm_fuzz::{drive, DeviceInput, Input};
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::VirtioDevice;

const TAP: &str = "fz0";
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

struct Host {
    net: Mutex<Net>,
    /// Sends frames out of the tap's host side, to the guest.
    packet: i32,
    ifindex: i32,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: unshare(2) with a flag; it moves only this (the fuzzing) thread.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "virtio_net needs root for its own network namespace: {}",
            std::io::Error::last_os_error()
        );
        let net = Net::new(TAP, GUEST_MAC, 1500).expect("tap device");
        for args in [
            &["link", "set", TAP, "up"][..],
            &["addr", "add", "10.9.0.1/24", "dev", TAP],
        ] {
            let ok = Command::new("ip").args(args).status().expect("run ip");
            assert!(ok.success(), "ip {args:?}");
        }
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0);
        // SAFETY: socket(2) with constant arguments.
        let packet = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(packet >= 0, "{}", std::io::Error::last_os_error());
        Host {
            net: Mutex::new(net),
            packet,
            ifindex,
        }
    })
}

/// Sends `frame` (an Ethernet frame) out of the tap's host side: the device reads it from the
/// tap (behind a virtio header) and hands it to the guest.
fn inject(host: &Host, frame: &[u8]) {
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = host.ifindex;
    addr.sll_halen = 6;
    // SAFETY: the buffer and address are valid for the lengths given.
    unsafe {
        libc::sendto(
            host.packet,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
    }
}

// `frames:u8 (len:u16 frame)*frames` (host frames for the guest, at most 8), then a
// `DeviceInput`.
fuzz_target!(|data: &[u8]| {
    let mut r = Input(data);
    let host = host();
    let mut net = host.net.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..r.u8() % 9 {
        let len = usize::from(r.u16() % 2048);
        let frame = r.bytes(len);
        if frame.len() >= 14 {
            inject(host, frame);
        }
    }
    let input = DeviceInput::read(&mut r);
    drive(&mut *net, &input, |_, _| {});
    net.reset();
});
