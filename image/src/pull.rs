//! Registry pulls over the distribution API, with `oci-client`.

use crate::blob::{self, BlobWriter};
use crate::index::Index;
use crate::manifest::{self, Descriptor, Kind};
use crate::{
    import, progress_bar, short_digest, Error, Fetched, Image, ImageStore, PullOptions, Result,
};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// `busybox` → `docker.io/library/busybox:latest`; `localhost:5000/x:t`; `x@sha256:...`.
pub(crate) fn parse_reference(image: &str) -> Result<Reference> {
    image
        .parse::<Reference>()
        .map_err(|e| Error::InvalidReference {
            reference: image.to_string(),
            reason: format!("{e} (and no such file or directory)"),
        })
}

/// An error with its chain of causes: reqwest's own message ("error sending request") says
/// little without them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

fn registry_error(reference: &Reference, e: OciDistributionError) -> Error {
    let message = chain(&e);
    let unauthorized = match &e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { .. } => {
            let lower = message.to_ascii_lowercase();
            lower.contains("unauthorized") || lower.contains("denied")
        }
        _ => false,
    };
    if unauthorized {
        Error::Unauthorized {
            registry: reference.registry().to_string(),
            message,
        }
    } else {
        Error::Registry {
            reference: reference.whole(),
            message,
        }
    }
}

fn client_for(reference: &Reference, opts: &PullOptions) -> Client {
    let mut config = ClientConfig {
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        ..Default::default()
    };
    if opts.insecure {
        config.protocol =
            ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()]);
        config.accept_invalid_certificates = true;
    }
    Client::new(config)
}

fn auth_of(opts: &PullOptions) -> RegistryAuth {
    match (&opts.username, &opts.password) {
        (Some(user), Some(password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        (None, Some(token)) => RegistryAuth::Bearer(token.clone()),
        (Some(user), None) => RegistryAuth::Basic(user.clone(), String::new()),
        (None, None) => RegistryAuth::Anonymous,
    }
}

/// Fetches a manifest or index and checks it hashes to the digest the registry (or the
/// reference) claims.
async fn fetch_manifest(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
) -> Result<(Vec<u8>, String)> {
    let (bytes, digest) = client
        .pull_manifest_raw(reference, auth, manifest::ACCEPTED)
        .await
        .map_err(|e| registry_error(reference, e))?;
    let expected = reference.digest().map(str::to_string).unwrap_or(digest);
    // oci-client has read the body whole already; it goes no further than this.
    blob::check_size(
        "manifest",
        &expected,
        bytes.len() as u64,
        blob::MAX_MANIFEST_BYTES,
    )?;
    let actual = blob::sha256_digest(&bytes);
    if actual != expected {
        return Err(Error::CorruptBlob {
            digest: expected,
            origin: format!("registry {}", reference.registry()),
            reason: format!("the manifest hashes to {actual}"),
        });
    }
    Ok((bytes.to_vec(), actual))
}

pub(crate) async fn pull(
    store: &ImageStore,
    reference: &Reference,
    opts: &PullOptions,
) -> Result<(Image, Fetched)> {
    let name = reference.whole();
    // A digest reference to an image the store has needs no network.
    if let Some(digest) = reference.digest() {
        if let Some(record) = Index::load(store)?.by_id(digest).cloned() {
            return import::finish(
                store,
                record.id,
                vec![name],
                record.config,
                record.layers,
                Fetched::default(),
            );
        }
    }
    let client = client_for(reference, opts);
    let auth = auth_of(opts);
    let (mut bytes, mut digest) = fetch_manifest(&client, reference, &auth).await?;
    let mut depth = 0;
    let (config, layers) = loop {
        match manifest::parse(&bytes, &format!("{name} ({digest})"))? {
            Kind::Manifest { config, layers } => break (config, layers),
            Kind::Index(entries) => {
                depth += 1;
                if depth > 4 {
                    return Err(Error::InvalidImage {
                        origin: name,
                        reason: "indexes nested too deeply".into(),
                    });
                }
                let chosen = manifest::choose_platform(&entries, &format!("{name} ({digest})"))?;
                blob::check_manifest_size(chosen)?;
                let by_digest = reference.clone_with_digest(chosen.digest.clone());
                (bytes, digest) = fetch_manifest(&client, &by_digest, &auth).await?;
                if digest != chosen.digest {
                    return Err(Error::CorruptBlob {
                        digest: chosen.digest.clone(),
                        origin: format!("registry {}", reference.registry()),
                        reason: format!("the manifest hashes to {digest}"),
                    });
                }
            }
        }
    };
    // Refused before anything is downloaded or stored.
    blob::check_config_size(&config)?;
    let origin = format!("registry {}", reference.registry());
    blob::put_bytes(store, &digest, &bytes, &origin)?;
    let mut fetched = Fetched::default();
    for desc in std::iter::once(&config).chain(layers.iter()) {
        if blob::has_blob(store, &desc.digest)? {
            continue;
        }
        download_blob(store, &client, reference, desc, opts).await?;
        fetched.blobs_downloaded += 1;
    }
    import::finish(store, digest, vec![name], config, layers, fetched)
}

async fn download_blob(
    store: &ImageStore,
    client: &Client,
    reference: &Reference,
    desc: &Descriptor,
    opts: &PullOptions,
) -> Result<()> {
    blob::digest_hex(&desc.digest)?;
    let layer = oci_client::manifest::OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.clone(),
        size: desc.size as i64,
        ..Default::default()
    };
    let mut stream = client
        .pull_blob_stream(reference, &layer)
        .await
        .map_err(|e| registry_error(reference, e))?;
    let bar = progress_bar(
        opts.progress,
        desc.size,
        format!("pull {}", short_digest(&desc.digest)),
    );
    let origin = format!("registry {}", reference.registry());
    let mut writer = BlobWriter::new(store, &origin)?;
    while let Some(chunk) = stream.stream.next().await {
        let chunk = chunk.map_err(|e| {
            let reason = chain(&e);
            // oci-client checks the digest at the end of the stream too; report it as ours.
            if reason.to_ascii_lowercase().contains("digest") {
                Error::CorruptBlob {
                    digest: desc.digest.clone(),
                    origin: origin.clone(),
                    reason,
                }
            } else {
                Error::Registry {
                    reference: reference.whole(),
                    message: format!("downloading {}: {reason}", desc.digest),
                }
            }
        })?;
        writer.write(&chunk)?;
        bar.inc(chunk.len() as u64);
        if writer.written() > desc.size {
            // A registry that sends more than the manifest says would only fill the disk.
            return Err(Error::CorruptBlob {
                digest: desc.digest.clone(),
                origin,
                reason: format!("more than the {} bytes the manifest gives", desc.size),
            });
        }
    }
    bar.finish_and_clear();
    writer.commit(&desc.digest, Some(desc.size))
}
