//! A Linux tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), non-blocking.
//!
//! Every frame read or written carries a 12-byte `virtio_net_hdr_v1` in front
//! (`TUNSETVNETHDRSZ`), the same header the virtio 1.x driver uses, so frames cross between the
//! guest's buffers and the tap unchanged. `TUNSETOFFLOAD` says which offloaded frames (partial
//! checksums, TSO/UFO super-frames) the kernel may hand us; it is set from the features the
//! driver accepted, so the guest never receives a frame it did not ask for.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `sizeof(struct virtio_net_hdr_v1)`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;

/// Offload sets tried at creation, richest first; the first the kernel accepts is what the
/// device may offer the guest (`TUN_F_UFO` is missing from kernels between 4.14 and its return).
const OFFLOAD_CANDIDATES: &[u32] = &[
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    libc::TUN_F_CSUM,
];

/// Why a tap cannot back a net device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap name {0:?} is not a valid interface name (1 to 15 bytes, no '/', '%', NUL or space)"
    )]
    InvalidName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to tap {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("{name} is not a tap with IFF_NO_PI and IFF_VNET_HDR (flags {flags:#x})")]
    NotATap { name: String, flags: libc::c_int },
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The `TUN_F_*` offloads the kernel accepted for this tap.
    offloads: u32,
}

impl Tap {
    /// Attaches to the tap `name`, creating it if it does not exist (it then lives as long as
    /// this `Tap`, unless made persistent by someone else), with a virtio 1.x header on every frame.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let ifr_name = ifr_name(name).ok_or_else(|| TapError::InvalidName(name.to_string()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(ifr_name);
        req.data.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is; the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Self::with_file(file, name.to_string())
    }

    /// Takes over an already attached tap queue, such as one opened inside a pod's network
    /// namespace and inherited from the process that started the VMM (a tap by name would be
    /// looked up in the VMM's own namespace). It must be a tap with `IFF_NO_PI|IFF_VNET_HDR`.
    /// The fd is made non-blocking; the tap's MTU is left as its owner set it.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let mut req = IfReq::new([0; libc::IFNAMSIZ]);
        // SAFETY: TUNGETIFF writes one ifreq into `req`; the fd is ours.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        let fd_name = || format!("fd {}", fd.as_raw_fd());
        if r < 0 {
            return Err(TapError::Attach {
                name: fd_name(),
                source: io::Error::last_os_error(),
            });
        }
        let name: String = req
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        // SAFETY: TUNGETIFF filled the flags member.
        let flags = libc::c_int::from(unsafe { req.data.flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & wanted != wanted || flags & libc::IFF_TUN != 0 {
            return Err(TapError::NotATap { name, flags });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        let r = unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "fcntl O_NONBLOCK",
                source: io::Error::last_os_error(),
            });
        }
        Self::with_file(File::from(fd), name)
    }

    /// Sets the virtio header size and probes the offloads of an attached tap.
    fn with_file(file: File, name: String) -> Result<Self, TapError> {
        let mut tap = Self {
            file,
            name,
            offloads: 0,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        let r = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(r, "TUNSETVNETHDRSZ")?;
        tap.offloads = OFFLOAD_CANDIDATES
            .iter()
            .copied()
            .find(|&o| tap.set_offloads(o).is_ok())
            .unwrap_or(0);
        // Nothing offloaded until a driver asks for it.
        tap.set_offloads(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` offloads this tap supports.
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    /// Lets the kernel hand us frames with the `TUN_F_*` offloads in `flags`.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        self.check(r, "TUNSETOFFLOAD")
    }

    /// Sets the tap's MTU (so that the host side sends the guest no frame larger than it takes).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let mut req = IfReq::new(ifr_name(&self.name).unwrap_or_default());
        req.data.mtu = libc::c_int::from(mtu);
        // SAFETY: a plain datagram socket for the interface ioctl, closed when `sock` drops.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        self.check(sock, "socket")?;
        // SAFETY: `sock` is a new fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: SIOCSIFMTU reads an ifreq, which `req` is.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) };
        self.check(r, "SIOCSIFMTU")
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (header included) gathered from `iovs`, with one `writev`.
    pub fn write_gathered(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: writev only reads through the pointers, inside the kernel, which fails with
        // EFAULT on an address that is not mapped readable; nothing of this process is written.
        let n = unsafe { libc::writev(self.fd(), iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, r: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

/// `struct ifreq` with the two union members used here.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    /// The union's real size (`struct sockaddr` and `struct ifmap` are the largest members).
    _pad: [u8; 24],
}

impl IfReq {
    fn new(name: [libc::c_char; libc::IFNAMSIZ]) -> Self {
        Self {
            name,
            data: IfReqData { _pad: [0; 24] },
        }
    }
}

/// `name` as a NUL-terminated `ifr_name`, if it is a name the kernel would take literally.
fn ifr_name(name: &str) -> Option<[libc::c_char; libc::IFNAMSIZ]> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b'%' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if !ok || name == "." || name == ".." {
        return None;
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a/b", "tap%d", "sixteen-chars-xx", "a b", "..", "x:1"] {
            assert!(ifr_name(bad).is_none(), "{bad:?}");
        }
        let n = ifr_name("tap0").unwrap();
        assert_eq!(&n[..5], &[b't' as _, b'a' as _, b'p' as _, b'0' as _, 0]);
        assert!(ifr_name("fifteen-chars-x").is_some());
    }

    #[test]
    fn an_inherited_fd_is_taken_over() {
        super::super::tests::in_own_netns(|| {
            let opened = Tap::open("inherit0").expect("create a tap");
            // What a parent would hand over: another fd on the same attached queue, blocking.
            let fd = OwnedFd::from(opened.file.try_clone().unwrap());
            let tap = Tap::from_fd(fd).expect("take over the fd");
            assert_eq!(tap.name(), "inherit0");
            assert_eq!(tap.supported_offloads(), opened.supported_offloads());
            let mut buf = [0u8; 64];
            let err = tap.read_frame(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "made non-blocking");

            let not_a_tap = OwnedFd::from(File::open("/dev/null").unwrap());
            assert!(matches!(
                Tap::from_fd(not_a_tap),
                Err(TapError::Attach { .. })
            ));
        });
    }
}
