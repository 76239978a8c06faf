//! The crate's error type: every variant names the reference (or file) and the cause.

use std::path::PathBuf;

/// Errors from pulling, pushing, the store and credential loading.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Ref(#[from] crate::RefError),
    #[error("{reference}: not found in the registry ({cause})")]
    NotFound { reference: String, cause: String },
    #[error(
        "{reference}: unauthorized at registry {registry} ({cause}); check the credentials for {registry} in the Docker config file or the pod's imagePullSecrets"
    )]
    Unauthorized {
        reference: String,
        registry: String,
        cause: String,
    },
    #[error("{reference}: not a wasm artifact: found {found}")]
    NotWasm { reference: String, found: String },
    #[error("{reference}: digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        reference: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{reference}: registry unreachable: {cause}")]
    Unreachable { reference: String, cause: String },
    #[error("{reference}: not present in the local store and the pull policy is Never")]
    NeverPull { reference: String },
    #[error("{reference}: registry error: {cause}")]
    Registry { reference: String, cause: String },
    #[error("{reference}: invalid manifest: {cause}")]
    BadManifest { reference: String, cause: String },
    #[error("{file}: {cause}")]
    BadFile { file: PathBuf, cause: String },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials in {source_name}: {cause}")]
    Credentials { source_name: String, cause: String },
}

impl OciError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OciError::Io {
            path: path.into(),
            source,
        }
    }

    /// The kubelet's name for this failure, for pod status `reason`s.
    pub fn kubelet_reason(&self) -> &'static str {
        match self {
            OciError::Ref(_) => "InvalidImageName",
            OciError::NeverPull { .. } => "ErrImageNeverPull",
            _ => "ErrImagePull",
        }
    }

    /// Whether retrying later might succeed without anyone changing anything
    /// (registry down, network trouble, server errors). `NotFound`,
    /// `Unauthorized`, `NotWasm` and bad references are not transient, though a
    /// node agent still retries them with back-off as the kubelet does.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OciError::Unreachable { .. } | OciError::Registry { .. } | OciError::Io { .. }
        )
    }
}

/// Map an oci-client error to ours, naming the reference.
pub(crate) fn from_client(
    reference: &str,
    registry: &str,
    e: oci_client::errors::OciDistributionError,
) -> OciError {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
    let reference = reference.to_string();
    match e {
        E::UnauthorizedError { url } => OciError::Unauthorized {
            reference,
            registry: registry.to_string(),
            cause: format!("401 from {url}"),
        },
        E::AuthenticationFailure(m) => OciError::Unauthorized {
            reference,
            registry: registry.to_string(),
            cause: format!("token request refused: {}", m.trim()),
        },
        E::RegistryError { envelope, url } => {
            let cause = format!(
                "{} ({url})",
                envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                )
            }) {
                OciError::NotFound { reference, cause }
            } else if codes
                .iter()
                .any(|c| matches!(c, C::Unauthorized | C::Denied))
            {
                OciError::Unauthorized {
                    reference,
                    registry: registry.to_string(),
                    cause,
                }
            } else {
                OciError::Registry { reference, cause }
            }
        }
        E::ServerError { code, url, message } => {
            let cause = format!("HTTP {code} from {url}: {}", message.trim());
            match code {
                404 => OciError::NotFound { reference, cause },
                401 | 403 => OciError::Unauthorized {
                    reference,
                    registry: registry.to_string(),
                    cause,
                },
                _ => OciError::Registry { reference, cause },
            }
        }
        E::DigestError(d) => {
            let (expected, actual) = match &d {
                oci_client::errors::DigestError::VerificationError { expected, actual } => {
                    (expected.clone(), actual.clone())
                }
                other => (String::new(), other.to_string()),
            };
            OciError::DigestMismatch {
                reference,
                what: "content from the registry".into(),
                expected,
                actual,
            }
        }
        // reqwest's error_for_status() (used by e.g. blob_exists) carries a status.
        E::RequestError(r) => match r.status().map(|s| s.as_u16()) {
            Some(401 | 403) => OciError::Unauthorized {
                reference,
                registry: registry.to_string(),
                cause: error_chain(&r),
            },
            Some(404) => OciError::NotFound {
                reference,
                cause: error_chain(&r),
            },
            Some(_) => OciError::Registry {
                reference,
                cause: error_chain(&r),
            },
            None => OciError::Unreachable {
                reference,
                cause: error_chain(&r),
            },
        },
        E::IoError(io) => OciError::Unreachable {
            reference,
            cause: io.to_string(),
        },
        other => OciError::Registry {
            reference,
            cause: other.to_string(),
        },
    }
}

/// "a: b: c" from an error and its sources (reqwest hides the useful part in sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
