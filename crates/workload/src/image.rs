//! One image resolver for both fronts: local files (standalone) and OCI references, to a content
//! digest and the module's bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci::{Credentials, ImageRef, PullPolicy};

use crate::plan::LocalImages;
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
    #[error(
        "image {image:?} names a local file, but this node takes registry references only (HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]); an operator may allow a folder with --allow-local-images"
    )]
    LocalRefused { image: String },
    #[error(
        "image {image:?} is not a file beneath {allowed} (--allow-local-images), or leaves it through a link"
    )]
    NotBeneath { image: String, allowed: PathBuf },
    #[error("image {image:?}: the task reading it failed")]
    Task { image: String },
    #[error("image {image:?}: {path} is not a regular file")]
    NotAFile { image: String, path: PathBuf },
    #[error(transparent)]
    Pull(#[from] oci::OciError),
}

impl ImageError {
    /// The waiting reason a kubelet would show.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Reference { .. }
            | ImageError::LocalRefused { .. }
            | ImageError::NotBeneath { .. } => "InvalidImageName",
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

    /// Resolves `image` and returns its digest and bytes. Local forms are subject to `local`
    /// (checked before any file is opened); relative paths resolve against `base_dir`.
    pub async fn fetch(
        &self,
        image: &str,
        pull_policy: Option<&str>,
        local: &LocalImages,
        base_dir: Option<&Path>,
        creds: Option<&Credentials>,
    ) -> Result<Fetched, ImageError> {
        let reference = ImageRef::parse(image).map_err(|source| ImageError::Reference {
            image: image.into(),
            source,
        })?;
        match reference {
            ImageRef::Local(path) => {
                let open = match local {
                    LocalImages::Refused => {
                        return Err(ImageError::LocalRefused {
                            image: image.into(),
                        });
                    }
                    LocalImages::Any => {
                        let path = match (path.is_absolute(), base_dir) {
                            (false, Some(base)) => base.join(path),
                            _ => path,
                        };
                        LocalOpen::Path(path)
                    }
                    LocalImages::Beneath(dir) => {
                        let rel = beneath(dir, &path).ok_or_else(|| ImageError::NotBeneath {
                            image: image.into(),
                            allowed: dir.clone(),
                        })?;
                        LocalOpen::Beneath {
                            dir: dir.clone(),
                            rel,
                        }
                    }
                };
                let name = image.to_string();
                let image_name = |_: &tokio::task::JoinError| image.to_string();
                tokio::task::spawn_blocking(move || read_local(&name, open))
                    .await
                    .map_err(|e| ImageError::Task {
                        image: image_name(&e),
                    })?
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

enum LocalOpen {
    Path(PathBuf),
    Beneath { dir: PathBuf, rel: PathBuf },
}

/// `path` relative to `dir`: a relative path as it is, an absolute one with `dir` stripped;
/// None when it is absolute elsewhere or climbs out with `..`.
fn beneath(dir: &Path, path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let rel = if path.is_absolute() {
        path.strip_prefix(dir).ok()?.to_path_buf()
    } else {
        path.to_path_buf()
    };
    let ok = rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    (ok && rel.components().next().is_some()).then_some(rel)
}

/// Reads a local module (blocking). Beneath a folder, the kernel resolves the path without
/// leaving it (`openat2` with `RESOLVE_BENEATH`: no `..`, absolute or symlink escape).
fn read_local(image: &str, open: LocalOpen) -> Result<Fetched, ImageError> {
    use std::io::Read;
    let file_err = |path: &Path, source: std::io::Error| ImageError::File {
        image: image.into(),
        path: path.to_path_buf(),
        source,
    };
    let (file, path) = match open {
        LocalOpen::Path(path) => {
            let f = std::fs::File::open(&path).map_err(|e| file_err(&path, e))?;
            (f, path)
        }
        LocalOpen::Beneath { dir, rel } => {
            use rustix::fs::{Mode, OFlags, ResolveFlags};
            let full = dir.join(&rel);
            let root = rustix::fs::open(
                &dir,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| file_err(&dir, e.into()))?;
            let fd = rustix::fs::openat2(
                &root,
                &rel,
                OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            )
            .map_err(|e| match e {
                rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => ImageError::NotBeneath {
                    image: image.into(),
                    allowed: dir.clone(),
                },
                e => file_err(&full, e.into()),
            })?;
            (std::fs::File::from(fd), full)
        }
    };
    let meta = file.metadata().map_err(|e| file_err(&path, e))?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile {
            image: image.into(),
            path,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_LOCAL_MODULE) as usize);
    file.take(MAX_LOCAL_MODULE)
        .read_to_end(&mut bytes)
        .map_err(|e| file_err(&path, e))?;
    Ok(Fetched {
        digest: sha256_digest(&bytes),
        bytes,
    })
}

/// Largest local module read.
const MAX_LOCAL_MODULE: u64 = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beneath_keeps_paths_inside() {
        let d = Path::new("/srv/mods");
        assert_eq!(
            beneath(d, Path::new("/srv/mods/a/x.wasm")),
            Some("a/x.wasm".into())
        );
        assert_eq!(beneath(d, Path::new("x.wasm")), Some("x.wasm".into()));
        assert_eq!(beneath(d, Path::new("/srv/mods/../etc/shadow")), None);
        assert_eq!(beneath(d, Path::new("/etc/shadow")), None);
        assert_eq!(beneath(d, Path::new("../x.wasm")), None);
        assert_eq!(beneath(d, Path::new("/srv/mods")), None);
    }
}
