//! The parts of OCI and Docker v2 manifests and indexes that the store reads. Parsed loosely
//! (both formats share these field names) so that docker-archive and registry manifests of
//! either flavour go through one path.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// The media types we ask registries for.
pub(crate) const ACCEPTED: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

/// A manifest or an index: which one is told by which fields are present.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Parsed {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

pub(crate) enum Kind {
    Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index(Vec<Descriptor>),
}

pub(crate) fn parse(bytes: &[u8], origin: &str) -> Result<Kind> {
    let parsed: Parsed = serde_json::from_slice(bytes).map_err(|e| Error::InvalidImage {
        origin: origin.to_string(),
        reason: format!("not an OCI/Docker manifest or index: {e}"),
    })?;
    if let Some(manifests) = parsed.manifests {
        return Ok(Kind::Index(manifests));
    }
    match (parsed.config, parsed.layers) {
        (Some(config), Some(layers)) => Ok(Kind::Manifest { config, layers }),
        _ => Err(Error::InvalidImage {
            origin: origin.to_string(),
            reason: format!(
                "manifest without config or layers (media type {})",
                parsed.media_type.as_deref().unwrap_or("unknown")
            ),
        }),
    }
}

/// The linux/amd64 entry of an index; an entry without a platform is taken when it is the
/// only one (OCI layouts written by tools often have a single unannotated manifest).
pub(crate) fn choose_platform<'a>(
    entries: &'a [Descriptor],
    origin: &str,
) -> Result<&'a Descriptor> {
    let is_image = |d: &&Descriptor| {
        // Attestation manifests (buildkit) carry platform unknown/unknown; skip them.
        !d.annotations.contains_key("vnd.docker.reference.type")
    };
    if let Some(d) = entries.iter().filter(is_image).find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    }) {
        return Ok(d);
    }
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(is_image)
        .filter(|d| d.platform.is_none())
        .collect();
    if candidates.len() == 1 {
        return Ok(candidates[0]);
    }
    let offered: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    Err(Error::InvalidImage {
        origin: origin.to_string(),
        reason: if entries.is_empty() {
            "the index lists no manifests".into()
        } else {
            format!("no linux/amd64 manifest (offered: {})", offered.join(", "))
        },
    })
}

/// Serializes an OCI image manifest for an image assembled from a docker-archive.
pub(crate) fn oci_manifest_bytes(config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Manifest<'a> {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        #[serde(rename = "mediaType")]
        media_type: &'a str,
        config: &'a Descriptor,
        layers: &'a [Descriptor],
    }
    serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config,
        layers,
    })
    .expect("a manifest serializes")
}

#[cfg(test)]
mod tests {
    /// An image config as docker (buildkit) writes it, with its nulls and empty maps: the
    /// store hands it out as `ImageConfiguration`, so it must parse.
    #[test]
    fn docker_style_config_parses() {
        let config = r##"{
            "architecture": "amd64",
            "config": {
                "Hostname": "", "Domainname": "", "User": "", "AttachStdin": false,
                "Tty": false, "OpenStdin": false, "StdinOnce": false,
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["sh"], "Image": "sha256:abc", "Volumes": {"/data": {}},
                "WorkingDir": "", "Entrypoint": null, "OnBuild": null, "Labels": null,
                "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGTERM"
            },
            "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) CMD [\"sh\"]"]},
            "created": "2024-09-26T21:31:42.130628131Z",
            "docker_version": "23.0.11",
            "history": [
                {"created": "2024-09-26T21:31:42Z", "created_by": "ADD file:abc in / "},
                {"created": "2024-09-26T21:31:42Z", "created_by": "CMD [\"sh\"]", "empty_layer": true}
            ],
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}
        }"##;
        let parsed: crate::ImageConfiguration = serde_json::from_str(config).unwrap();
        let c = parsed.config().as_ref().unwrap();
        assert_eq!(c.cmd().as_ref().unwrap(), &vec!["sh".to_string()]);
        assert!(c.entrypoint().is_none());
    }
}
