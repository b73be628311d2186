//! Placeholder until the virtio-vsock device lands.
use std::path::Path;
#[derive(Debug, thiserror::Error)]
#[error("virtio-vsock is not built yet")]
pub struct VsockError;
pub struct Vsock;
impl Vsock {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(_cid: u64, _path: &Path) -> Result<crate::devices::virtio::rng::Rng, VsockError> {
        Err(VsockError)
    }
}
