//! One image resolver for both fronts: local files (standalone) and OCI references, to a content
//! digest and the module's bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci::{Credentials, ImageRef, PullPolicy};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {image:?}: {source}")]
    Reference {
        image: String,
        source: oci::RefError,
    },
    #[error("image {image:?}: cannot read {path}: {source}")]
    File {
        image: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {image:?} is an OCI reference, but this wasinode has no registry client")]
    NoRegistry { image: String },
    #[error(transparent)]
    Pull(#[from] oci::OciError),
}

impl ImageError {
    /// The waiting reason a kubelet would show.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Reference { .. } => "InvalidImageName",
            ImageError::Pull(e) => e.kubelet_reason(),
            _ => "ErrImagePull",
        }
    }
}

/// A module's bytes and identity.
pub struct Fetched {
    /// `sha256:<hex>` of the module's bytes (the wasm layer digest for OCI images).
    pub digest: String,
    pub bytes: Vec<u8>,
}

/// How registry pulls retry: standalone gives up after a short bounded retry; the node agent
/// retries with kubelet back-off itself.
#[derive(Clone, Copy, Debug)]
pub struct PullRetry {
    pub attempts: u32,
    pub first_delay: Duration,
}

#[derive(Clone)]
pub struct Images {
    client: Option<oci::Client>,
    retry: PullRetry,
}

impl Images {
    pub fn new(client: Option<oci::Client>, retry: PullRetry) -> Self {
        Self { client, retry }
    }

    /// Resolves `image` (relative paths against `base_dir`) and returns its digest and bytes.
    pub async fn fetch(
        &self,
        image: &str,
        pull_policy: Option<&str>,
        base_dir: Option<&Path>,
        creds: Option<&Credentials>,
    ) -> Result<Fetched, ImageError> {
        let reference = ImageRef::parse(image).map_err(|source| ImageError::Reference {
            image: image.into(),
            source,
        })?;
        match reference {
            ImageRef::Local(path) => {
                let path = match (path.is_absolute(), base_dir) {
                    (false, Some(base)) => base.join(path),
                    _ => path,
                };
                let bytes = tokio::fs::read(&path)
                    .await
                    .map_err(|source| ImageError::File {
                        image: image.into(),
                        path: path.clone(),
                        source,
                    })?;
                Ok(Fetched {
                    digest: sha256_digest(&bytes),
                    bytes,
                })
            }
            ImageRef::Registry(r) => {
                let client = self.client.as_ref().ok_or_else(|| ImageError::NoRegistry {
                    image: image.into(),
                })?;
                let policy =
                    PullPolicy::parse(pull_policy, &r).map_err(|source| ImageError::Reference {
                        image: image.into(),
                        source,
                    })?;
                let pulled = client
                    .pull_bounded(
                        &r,
                        policy,
                        creds,
                        self.retry.attempts,
                        self.retry.first_delay,
                    )
                    .await?;
                let bytes =
                    tokio::fs::read(&pulled.path)
                        .await
                        .map_err(|source| ImageError::File {
                            image: image.into(),
                            path: pulled.path.clone(),
                            source,
                        })?;
                Ok(Fetched {
                    digest: pulled.layer_digest,
                    bytes,
                })
            }
        }
    }
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}
