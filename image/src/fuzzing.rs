//! Entry points for the fuzz targets in `fuzz/` (not an API): the parsers of hostile image
//! input, which are private to the store, each called exactly as the store calls it.

use std::path::Path;

use crate::{manifest, unpack, user, Error, ImageConfiguration, Result, UnpackLimits, User};

/// Applies one uncompressed layer (tar bytes) to the tree under `root`, as unpacking an image
/// does for each of its layers.
pub fn apply_layer(root: &Path, layer: &[u8], limits: &UnpackLimits) -> Result<()> {
    let reader: Box<dyn std::io::Read> = Box::new(std::io::Cursor::new(layer.to_vec()));
    unpack::apply_layer(
        root,
        reader,
        "sha256:fuzz",
        limits,
        &mut unpack::Totals::default(),
    )
}

/// Parses a manifest or an index; for an index, chooses the linux/amd64 entry.
pub fn parse_manifest(bytes: &[u8]) -> Result<()> {
    match manifest::parse(bytes, "fuzz")? {
        manifest::Kind::Manifest { .. } => Ok(()),
        manifest::Kind::Index(entries) => manifest::choose_platform(&entries, "fuzz").map(|_| ()),
    }
}

/// Parses an image configuration blob the way the store reads it.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration> {
    serde_json::from_slice(bytes).map_err(|e| Error::InvalidImage {
        origin: "fuzz".into(),
        reason: e.to_string(),
    })
}

/// Resolves `spec` (`-u USER[:GROUP]`) against an image's /etc/passwd and /etc/group.
pub fn resolve_user(passwd: &str, group: &str, spec: &str) -> Result<User> {
    user::UserDb::parse(&user::UserFiles {
        passwd: Some(passwd.into()),
        group: Some(group.into()),
    })
    .resolve(spec)
}
