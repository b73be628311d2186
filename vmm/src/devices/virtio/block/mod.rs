//! Placeholder until the virtio-block device lands.
use std::path::Path;
#[derive(Debug, thiserror::Error)]
#[error("virtio-block is not built yet")]
pub struct BlockError;
pub struct Block;
impl Block {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(
        _path: &Path,
        _read_only: bool,
    ) -> Result<crate::devices::virtio::rng::Rng, BlockError> {
        Err(BlockError)
    }
}
