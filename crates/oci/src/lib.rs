//! wasinode's OCI layer: image references, pull policy, registry pull/push of
//! wasm artifacts (CNCF layout and the older wasm-to-oci layout), registry
//! credentials, and the content-addressed module store under the data dir.
//!
//! This crate owns bytes-on-disk and the registry protocol only. It must not
//! touch wasmtime (compiling/running modules is `runtime`'s job) nor the
//! Kubernetes API (callers hand it `imagePullSecrets` bytes and pull policies).

pub mod reference;

pub use reference::{ImageRef, PullPolicy, RefError, Reference, parse_reference};
pub mod client;
pub mod credentials;
pub mod error;
pub mod manifest;
pub mod store;
pub mod wasm;

pub use client::{Backoff, Client, NoProgress, Progress, Pulled};
pub use credentials::{Auth, Credentials};
pub use error::OciError;
pub use store::{GcReport, Store};

/// The default data directory (the store lives in `<data_dir>/oci`):
/// `$WASINODE_DATA_DIR`, else `$XDG_DATA_HOME/wasinode`, else
/// `$HOME/.local/share/wasinode`, else `./.wasinode`.
pub fn default_data_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("WASINODE_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = var("XDG_DATA_HOME") {
        return PathBuf::from(d).join("wasinode");
    }
    if let Some(h) = var("HOME") {
        return PathBuf::from(h).join(".local/share/wasinode");
    }
    PathBuf::from(".wasinode")
}
