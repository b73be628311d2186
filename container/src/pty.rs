//! Terminals: the pty is opened by the container process from the container's own
//! `/dev/ptmx` (its devpts instance), so `tty` inside prints `/dev/pts/N` that exists there;
//! the master goes back to the parent over a Unix socket (SCM_RIGHTS).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage,
    RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::pty::{ioctl_tiocgptpeer, openpt, unlockpt, OpenptFlags};
use rustix::termios::{tcsetwinsize, Winsize};

use crate::child::{ChildError, StepResult};
use crate::process_setup;
use crate::Error;

/// The socket pair the master is passed over: (parent end, child end), both close-on-exec.
pub(crate) fn socket_pair() -> Result<(OwnedFd, OwnedFd), Error> {
    socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("socketpair for the pty master", e))
}

/// Child: opens a pty pair in the container's devpts, sizes it and sends the master to the
/// parent; returns the slave.
pub(crate) fn open_in_container(rows: u16, cols: u16, socket: &OwnedFd) -> StepResult<OwnedFd> {
    let step = "terminal";
    let master =
        openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).map_err(|e| {
            ChildError::io(
                step,
                "opening /dev/ptmx in the container (a devpts mount at /dev/pts is needed)",
                e.into(),
            )
        })?;
    unlockpt(&master).map_err(|e| ChildError::io(step, "unlockpt", e.into()))?;
    let slave = ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY)
        .map_err(|e| ChildError::io(step, "opening the pty slave (TIOCGPTPEER)", e.into()))?;
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    tcsetwinsize(&master, size).map_err(|e| ChildError::io(step, "TIOCSWINSZ", e.into()))?;
    let fds = [master.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    sendmsg(
        socket,
        &[IoSlice::new(b"M")],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| ChildError::io(step, "sending the pty master to the agent", e.into()))?;
    Ok(slave)
}

/// Child: the slave becomes the controlling terminal (the process leads its own session
/// already) and stdin/stdout/stderr.
pub(crate) fn make_controlling_terminal(slave: OwnedFd) -> StepResult {
    rustix::process::ioctl_tiocsctty(&slave)
        .map_err(|e| ChildError::io("terminal", "TIOCSCTTY", e.into()))?;
    process_setup::install_stdio([slave.as_raw_fd(); 3])
}

/// Parent: receives the master the child sent (it is queued by the time exec succeeded).
pub(crate) fn receive_master(socket: &OwnedFd) -> Result<OwnedFd, Error> {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io("receiving the pty master from the container process", e))?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(Error::io(
        "receiving the pty master from the container process",
        std::io::Error::other("no file descriptor in the message"),
    ))
}
