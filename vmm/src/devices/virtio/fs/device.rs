//! State of the virtio-fs device: the connection to the daemon, the negotiated features, the
//! queues' kick and call eventfds.

use std::path::Path;

use tracing::{error, info};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frontend;
use crate::devices::virtio::{
    device_type, read_config_space, ActivateError, DeviceCore, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Request queues besides the high-priority queue (virtio-fs 5.11.2); the daemon serves each.
pub const NUM_REQUEST_QUEUES: u32 = 1;
const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
const QUEUE_SIZES: &[u16] = &[256; NUM_QUEUES];
/// The tag field of the configuration space: UTF-8, NUL-padded, not NUL-terminated when full.
pub const TAG_MAX_LEN: usize = 36;

/// Ring features the guest may use when the daemon offers them; anything else the daemon offers
/// (logging, protocol features) is between the VMM and the daemon.
const GUEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Protocol features the VMM uses when the daemon offers them: several queues, and replies
/// to every request (so a failed setup step is reported where it happened).
const PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    Tag(String),
    #[error("virtio-fs daemon at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: vhost::Error,
    },
    #[error("virtio-fs daemon: {0}")]
    Handshake(#[from] vhost::Error),
    #[error("virtio-fs daemon offers {0} queues, the device needs {NUM_QUEUES}")]
    QueueCount(u64),
    #[error("virtio-fs daemon does not offer VIRTIO_F_VERSION_1")]
    NotVersion1,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Fs {
    /// The core's queue eventfds are the kicks: registered with KVM as the queues' ioeventfds
    /// and read by the daemon, never by the VMM's event loop (see the event handler).
    pub(super) core: DeviceCore,
    config: [u8; TAG_MAX_LEN + 4],
    frontend: Frontend,
    /// What the daemon offered.
    backend_features: u64,
    /// Negotiated with the daemon at connection time, if it offered protocol features at all.
    protocol: Option<VhostUserProtocolFeatures>,
    /// Calls: written by the daemon, relayed to the guest's interrupt by the event handler.
    pub(super) call_evts: [EventFd; NUM_QUEUES],
}

impl Fs {
    /// Connects to the daemon's vhost-user socket and negotiates what does not depend on the
    /// guest: ownership, features, protocol features, queue count.
    pub fn new(tag: &str, socket: &Path) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        let mut frontend =
            Frontend::connect(socket, NUM_QUEUES as u64).map_err(|source| FsError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        frontend.set_owner()?;
        let backend_features = frontend.get_features()?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotVersion1);
        }
        let mut protocol = None;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend.get_protocol_features()?;
            let used = offered & PROTOCOL_FEATURES;
            frontend.set_protocol_features(used)?;
            if used.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num()?;
                if n < NUM_QUEUES as u64 {
                    return Err(FsError::QueueCount(n));
                }
            }
            protocol = Some(used);
        }
        info!("virtio-fs {tag:?}: daemon features {backend_features:#x}, protocol {protocol:?}");
        Ok(Self {
            core: DeviceCore::new(
                "virtio-fs",
                device_type::FS,
                backend_features & GUEST_FEATURES,
                QUEUE_SIZES,
            )?,
            config,
            frontend,
            backend_features,
            protocol,
            call_evts: [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?],
        })
    }

    /// The features sent to the daemon: the guest's, plus protocol features if negotiated.
    fn daemon_features(&self) -> u64 {
        let protocol = match self.protocol {
            Some(_) => VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            None => 0,
        };
        (self.core.acked_features() & self.backend_features) | protocol
    }
}

/// The configuration space (virtio-fs 5.11.4): `tag[36]`, then `num_request_queues` (le32).
fn config_space(tag: &str) -> Result<[u8; TAG_MAX_LEN + 4], FsError> {
    if tag.is_empty() || tag.len() > TAG_MAX_LEN {
        return Err(FsError::Tag(tag.into()));
    }
    let mut config = [0u8; TAG_MAX_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_MAX_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
    Ok(config)
}

impl VirtioDevice for Fs {
    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    /// The core holds the driver's queues (checked valid): hand them to the daemon.
    fn activated(&mut self) -> Result<(), ActivateError> {
        let features = self.daemon_features();
        let Some(active) = self.core.active() else {
            return Err(ActivateError::Backend("not activated".into()));
        };
        frontend::start(
            &mut self.frontend,
            features,
            self.protocol,
            &active.mem,
            &active.queues,
            self.core.queue_events(),
            &self.call_evts,
        )
        .map_err(|e| ActivateError::Backend(e.to_string()))
    }

    fn resetting(&mut self) {
        if let Err(e) = frontend::stop(&mut self.frontend, NUM_QUEUES) {
            error!("virtio-fs: cannot stop the daemon's queues: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_tag_and_queue_count() {
        let c = config_space("microvm").unwrap();
        assert_eq!(&c[..7], b"microvm");
        assert!(c[7..TAG_MAX_LEN].iter().all(|&b| b == 0));
        assert_eq!(&c[TAG_MAX_LEN..], &1u32.to_le_bytes());
        let full = "x".repeat(TAG_MAX_LEN);
        assert_eq!(
            &config_space(&full).unwrap()[..TAG_MAX_LEN],
            full.as_bytes()
        );
        assert!(config_space("").is_err());
        assert!(config_space(&"x".repeat(TAG_MAX_LEN + 1)).is_err());
    }
}
