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

pub use client::{Client, NoProgress, Progress, Pulled};
pub use credentials::{Auth, Credentials};
pub use error::OciError;
pub use store::{GcReport, Store};
