//! The VM's tap device: `/dev/net/tun` ioctls (a tap cannot be created over rtnetlink).
//!
//! Every function here acts in the network namespace of the calling thread; callers run them
//! through [`crate::netns::run_in`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::Error;

/// The flags of every tap made here: Ethernet frames, no packet-information prefix, a
/// `virtio_net_hdr` in front of each frame (what the VMM's virtio-net device speaks).
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Whether `name` is an interface name the kernel takes literally (TUNSETIFF would expand a
/// `%d`; `/`, `:` and blanks are refused or ambiguous elsewhere).
pub fn valid_name(name: &str) -> bool {
    (1..libc::IFNAMSIZ).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'%' | b':'))
}

/// The virtio 1.x header (`struct virtio_net_hdr_v1`, 12 bytes) the VMM's device speaks; the
/// kernel's default is the legacy 10-byte one.
pub const VNET_HDR_LEN: libc::c_int = 12;

/// Creates the tap `name` and makes it persistent: it outlives this call's fd, so the VMM can
/// attach to it later (by name, or through [`open`]) and teardown deletes it explicitly. Its
/// header size (a property of the device, not of one fd) is set to [`VNET_HDR_LEN`].
pub fn create_persistent(name: &str) -> Result<(), Error> {
    let tun = attach(name, libc::O_CLOEXEC)?;
    let check = |r: libc::c_int, what: &'static str| {
        if r < 0 {
            return Err(Error::Tap {
                name: name.to_string(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer; `tun` is an open tun fd.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &VNET_HDR_LEN) };
    check(r, "TUNSETVNETHDRSZ")?;
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    check(r, "TUNSETPERSIST")
}

/// Opens a queue of the existing tap `name` (close-on-exec, blocking: the receiver sets its own
/// mode). The caller must have checked that the tap exists: TUNSETIFF creates a missing one.
pub fn open(name: &str) -> Result<OwnedFd, Error> {
    Ok(attach(name, libc::O_CLOEXEC)?.into())
}

fn attach(name: &str, open_flags: libc::c_int) -> Result<File, Error> {
    if !valid_name(name) {
        return Err(Error::InvalidName(name.to_string()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(open_flags)
        .open("/dev/net/tun")
        .map_err(|source| Error::Tap {
            name: name.to_string(),
            what: "open /dev/net/tun",
            source,
        })?;
    // SAFETY: an all-zero ifreq is valid (a name of NULs and a zero union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is; the fd is ours.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(Error::Tap {
            name: name.to_string(),
            what: "TUNSETIFF",
            source: io::Error::last_os_error(),
        });
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_takes_literally() {
        for good in ["tap0_mvm", "fifteen-chars-x", "eth0"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "tap%d",
            "a/b",
            "a b",
            "x:1",
            ".",
            "..",
            "sixteen-chars-xx",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
