//! What serving each kind of virtio device takes, per thread role. The event thread serves the
//! queues and the host side; a vCPU thread serves them too while the guest activates a device
//! (requests queued before `DRIVER_OK`, a tap's offloads, the vhost-user setup) or resets it.
//! A VM's filters hold only the lists of the devices it has.

use seccompiler::BackendError;
use vmm_api::VmConfig;

use super::ioctls::{FIONBIO, TUNSETOFFLOAD};
use super::rules::{all, arg_eq, arg_masked, ioctls, SyscallList};
use super::ThreadRole;

/// Which kinds of device a VM has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceSet {
    pub block: bool,
    /// Some disk has a rate limit (and so a timerfd).
    pub block_rate_limit: bool,
    pub vsock: bool,
    pub rng: bool,
    pub net: bool,
    pub fs: bool,
}

impl DeviceSet {
    pub fn of(config: &VmConfig) -> Self {
        Self {
            block: !config.disks.is_empty(),
            block_rate_limit: config
                .disks
                .iter()
                .any(|d| d.rate_limit.is_some_and(|l| l.is_limited())),
            vsock: config.vsock.is_some(),
            rng: config.rng,
            net: !config.nets.is_empty(),
            fs: !config.fs.is_empty(),
        }
    }

    /// Every kind: the widest filter a VM can get.
    pub fn all() -> Self {
        Self {
            block: true,
            block_rate_limit: true,
            vsock: true,
            rng: true,
            net: true,
            fs: true,
        }
    }

    pub fn list(self, role: ThreadRole) -> Result<SyscallList, BackendError> {
        let mut list = SyscallList::new();
        if self.block {
            list = list.merge(block());
        }
        if self.block_rate_limit {
            list = list.merge(block_rate_limit());
        }
        if self.vsock {
            list = list.merge(vsock(role)?);
        }
        // rng: getrandom(2), which every thread may call already.
        if self.net {
            list = list.merge(net()?);
        }
        if self.fs {
            list = list.merge(fs());
        }
        Ok(list)
    }
}

/// One `preadv`/`pwritev` per request on the backing file, `fdatasync` for a flush.
fn block() -> SyscallList {
    SyscallList::new().allow(&[libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_fdatasync])
}

/// The rate limit's timer: armed (`timerfd_settime`) wherever the queue is served or reset.
/// Reading its expiry is the event thread's `read`, which it has for every eventfd already.
fn block_rate_limit() -> SyscallList {
    SyscallList::new().allow(&[libc::SYS_timerfd_settime])
}

/// Host Unix stream sockets: reading and writing connections (`recv`/`send`, which `std` makes
/// `recvfrom`/`sendto`), shutting their write side; a guest connection to host port P is a
/// non-blocking `socket` + `connect` to `<uds>_P`, watched in the muxer's own epoll set; the
/// handshake timeout is a timerfd. The event thread also accepts host connections on the
/// listener (made non-blocking with `FIONBIO`), and at the VM's end checks that the socket file
/// is still its own (`statx`) and removes it.
fn vsock(role: ThreadRole) -> Result<SyscallList, BackendError> {
    let list = SyscallList::new()
        .allow(&[
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_connect,
            libc::SYS_epoll_ctl,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
        ])
        .allow_when(
            libc::SYS_socket,
            vec![all(vec![
                arg_eq(0, libc::AF_UNIX as u64)?,
                // The type without its SOCK_NONBLOCK/SOCK_CLOEXEC flags.
                arg_masked(1, 0xf, libc::SOCK_STREAM as u64)?,
            ])?],
        );
    Ok(match role {
        ThreadRole::Vcpu => list,
        ThreadRole::EventLoop => list
            .allow(&[libc::SYS_accept4, libc::SYS_statx, libc::SYS_unlink])
            .allow_when(libc::SYS_ioctl, ioctls(&[FIONBIO])?),
    })
}

/// Frames are one `read` (RX) or `writev` (TX) each on the tap; its offloads follow the
/// driver's features.
fn net() -> Result<SyscallList, BackendError> {
    Ok(SyscallList::new()
        .allow(&[libc::SYS_read, libc::SYS_writev])
        .allow_when(libc::SYS_ioctl, ioctls(&[TUNSETOFFLOAD])?))
}

/// The vhost-user frontend's messages to the daemon (memory table, rings, eventfds as
/// `SCM_RIGHTS`) and its replies.
fn fs() -> SyscallList {
    SyscallList::new().allow(&[libc::SYS_sendmsg, libc::SYS_recvmsg])
}
