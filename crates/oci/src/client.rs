//! Pull and push through oci-client, with our store, credentials, transport
//! policy (plain HTTP only for loopback and `--insecure-registry` hosts) and
//! single-flight downloads.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use oci_client::RegistryOperation;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;

use crate::credentials::{Auth, Credentials};
use crate::error::{error_chain, from_client};
use crate::manifest::{self, Descriptor, Manifest, Selection};
use crate::store::{BlobState, GcReport, Store, sha256_digest};
use crate::{OciError, PullPolicy, Reference};

/// Progress callbacks for long transfers. All methods default to doing nothing.
pub trait Progress: Send + Sync {
    /// `done` of `total` bytes of the current blob transferred.
    fn bytes(&self, _done: u64, _total: u64) {}
    /// A step ("resolving", "pushing layer sha256:…").
    fn message(&self, _m: &str) {}
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A pulled module: the wasm layer, verified, in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// sha256 of the wasm bytes (the layer digest).
    pub layer_digest: String,
    /// Digest of the image manifest holding the layer.
    pub manifest_digest: String,
    /// The verified blob in the store (shared by every pod using this digest; read-only).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// Registry client over a [`Store`]. Cheap to clone; clones share the store,
/// connection pools, tokens and in-flight downloads.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    creds: Credentials,
    insecure: Vec<String>,
    /// One oci-client per (registry, protocol, identity): oci-client keeps the
    /// first auth it sees for a registry, and pods may bring different secrets.
    clients: Mutex<HashMap<String, oci_client::Client>>,
    /// Single-flight: one download per blob digest at a time.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls hold it shared, gc exclusively, so gc never removes a blob being pulled.
    gc_lock: tokio::sync::RwLock<()>,
}

/// Whether a registry host is loopback (reached over plain HTTP, as Docker does).
pub fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    }
}

fn to_registry_auth(a: Option<&Auth>) -> RegistryAuth {
    match a {
        None => RegistryAuth::Anonymous,
        Some(Auth::Basic { username, password }) => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Some(Auth::Bearer(t)) => RegistryAuth::Bearer(t.clone()),
    }
}

fn auth_key(a: &RegistryAuth) -> String {
    match a {
        RegistryAuth::Anonymous => "anon".into(),
        RegistryAuth::Basic(u, p) => format!("basic:{u}:{}", sha256_digest(p.as_bytes())),
        RegistryAuth::Bearer(t) => format!("bearer:{}", sha256_digest(t.as_bytes())),
    }
}

impl Client {
    /// `insecure_registries` are `HOST[:PORT]` values reached over plain HTTP
    /// (a bare `HOST` matches any port). Loopback registries always are.
    pub fn new(store: Store, creds: Credentials, insecure_registries: Vec<String>) -> Self {
        Client {
            inner: Arc::new(Inner {
                store,
                creds,
                insecure: insecure_registries
                    .into_iter()
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect(),
                clients: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashMap::new()),
                gc_lock: tokio::sync::RwLock::new(()),
            }),
        }
    }

    /// The store this client fills.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Whether `registry` is reached over plain HTTP.
    pub fn plain_http(&self, registry: &str) -> bool {
        let reg = registry.to_ascii_lowercase();
        is_loopback(&reg)
            || self
                .inner
                .insecure
                .iter()
                .any(|i| *i == reg || (!i.contains(':') && i == host_of(&reg)))
    }

    fn oci(&self, registry: &str, auth: &RegistryAuth) -> oci_client::Client {
        let http = self.plain_http(registry);
        let key = format!("{registry}|{http}|{}", auth_key(auth));
        let mut clients = self.inner.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(key)
            .or_insert_with(|| {
                oci_client::Client::new(ClientConfig {
                    protocol: if http {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    connect_timeout: Some(Duration::from_secs(10)),
                    read_timeout: Some(Duration::from_secs(60)),
                    user_agent: concat!("wasinode/", env!("CARGO_PKG_VERSION")),
                    ..Default::default()
                })
            })
            .clone()
    }

    fn map_err(&self, r: &Reference, e: oci_client::errors::OciDistributionError) -> OciError {
        let reg = r.registry();
        let mut err = from_client(&r.to_string(), reg, e);
        if let OciError::Unreachable { cause, .. } = &mut err
            && !self.plain_http(reg)
        {
            cause.push_str(&format!(
                " (reached over HTTPS; if {reg} serves plain HTTP, name it with --insecure-registry {reg})"
            ));
        }
        err
    }

    /// [`Client::pull_with_progress`] without progress.
    pub async fn pull(
        &self,
        r: &Reference,
        policy: PullPolicy,
        extra: Option<&Credentials>,
    ) -> Result<Pulled, OciError> {
        self.pull_with_progress(r, policy, extra, &NoProgress).await
    }

    /// Resolve, fetch and verify; returns the wasm layer's digest and its
    /// verified blob in the store. `extra` credentials (a pod's
    /// `imagePullSecrets`) take precedence over the client's. Concurrent pulls of
    /// the same blob in one process download it once.
    pub async fn pull_with_progress(
        &self,
        r: &Reference,
        policy: PullPolicy,
        extra: Option<&Credentials>,
        progress: &dyn Progress,
    ) -> Result<Pulled, OciError> {
        let _gc = self.inner.gc_lock.read().await;
        if policy != PullPolicy::Always {
            if let Some(p) = self.local(r).await? {
                tracing::debug!(reference = %r, digest = %p.layer_digest, "using stored module");
                return Ok(p);
            }
            if policy == PullPolicy::Never {
                return Err(OciError::NeverPull {
                    reference: r.to_string(),
                });
            }
        }
        self.remote(r, extra, progress).await
    }

    /// What the store has for `r`, verified, without touching the network.
    pub async fn local(&self, r: &Reference) -> Result<Option<Pulled>, OciError> {
        let store = self.inner.store.clone();
        let name = r.to_string();
        let digest = r.digest().map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let mut md = match digest {
                Some(d) => d,
                None => match store.get_ref(&name)? {
                    Some(d) => d,
                    None => return Ok(None),
                },
            };
            for _ in 0..3 {
                let Some(bytes) = store.read_verified(&md)? else {
                    return Ok(None);
                };
                let Ok(m) = Manifest::parse(&bytes) else {
                    return Ok(None);
                };
                match m.select() {
                    Selection::Wasm(layer) => {
                        return Ok(match store.check_blob(&layer.digest)? {
                            BlobState::Verified { size } => Some(Pulled {
                                path: store.blob_path(&layer.digest),
                                layer_digest: layer.digest,
                                manifest_digest: md,
                                size,
                            }),
                            _ => None,
                        });
                    }
                    Selection::Child(d) => md = d.digest,
                    Selection::NotWasm(_) => return Ok(None),
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| OciError::io(self.inner.store.root(), std::io::Error::other(e)))?
    }

    async fn remote(
        &self,
        r: &Reference,
        extra: Option<&Credentials>,
        progress: &dyn Progress,
    ) -> Result<Pulled, OciError> {
        let name = r.to_string();
        let auth = match extra {
            Some(x) if x.lookup(r.registry()).is_some() => to_registry_auth(x.lookup(r.registry())),
            _ => to_registry_auth(self.inner.creds.lookup(r.registry())),
        };
        let client = self.oci(r.resolve_registry(), &auth);
        progress.message(&format!("resolving {name}"));
        tracing::info!(reference = %name, "pulling");

        // Manifests: the top one (maybe an index) and the image manifest.
        let mut manifests: Vec<(String, Vec<u8>)> = Vec::new();
        let mut cur_ref = r.clone();
        let layer: Descriptor = loop {
            let (bytes, digest) = client
                .pull_manifest_raw(&cur_ref, &auth, manifest::ACCEPTED)
                .await
                .map_err(|e| self.map_err(r, e))?;
            let actual = sha256_digest(&bytes);
            let expected = cur_ref.digest().unwrap_or(&digest).to_string();
            if actual != expected {
                return Err(OciError::DigestMismatch {
                    reference: name,
                    what: "manifest".into(),
                    expected,
                    actual,
                });
            }
            let m = Manifest::parse(&bytes).map_err(|cause| OciError::BadManifest {
                reference: name.clone(),
                cause,
            })?;
            manifests.push((actual, bytes.to_vec()));
            match m.select() {
                Selection::Wasm(l) => break l,
                Selection::NotWasm(found) => {
                    return Err(OciError::NotWasm {
                        reference: name,
                        found,
                    });
                }
                Selection::Child(d) if manifests.len() < 3 => {
                    cur_ref = r.clone_with_digest(d.digest);
                }
                Selection::Child(_) => {
                    return Err(OciError::BadManifest {
                        reference: name,
                        cause: "image indexes nested too deeply".into(),
                    });
                }
            }
        };
        if crate::store::digest_hex(&layer.digest).is_none() {
            return Err(OciError::BadManifest {
                reference: name,
                cause: format!("layer digest {:?} is not sha256:<64 hex>", layer.digest),
            });
        }
        let (path, size) = self.fetch_blob(&client, r, &layer, progress).await?;

        // Manifests after the layer, the tag last: a recorded ref is always complete.
        let store = &self.inner.store;
        for (d, b) in &manifests {
            store.put_bytes(d, b).map_err(|e| with_ref(e, &name))?;
        }
        let (top, _) = &manifests[0];
        if r.digest().is_none() {
            store.set_ref(&name, top)?;
        }
        let manifest_digest = manifests.last().map(|(d, _)| d.clone()).unwrap_or_default();
        tracing::info!(reference = %name, layer = %layer.digest, %manifest_digest, size, "pulled");
        Ok(Pulled {
            layer_digest: layer.digest,
            manifest_digest,
            path,
            size,
        })
    }

    async fn fetch_blob(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        layer: &Descriptor,
        progress: &dyn Progress,
    ) -> Result<(PathBuf, u64), OciError> {
        let name = r.to_string();
        let lock = {
            let mut m = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            m.entry(layer.digest.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        let store = self.inner.store.clone();
        let digest = layer.digest.clone();
        let state = tokio::task::spawn_blocking(move || store.check_blob(&digest))
            .await
            .map_err(|e| OciError::io(self.inner.store.root(), std::io::Error::other(e)))??;
        if let BlobState::Verified { size } = state {
            tracing::debug!(reference = %name, digest = %layer.digest, "layer already in the store");
            return Ok((self.inner.store.blob_path(&layer.digest), size));
        }
        progress.message(&format!("downloading {}", layer.digest));
        let desc = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: i64::try_from(layer.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut stream = client
            .pull_blob_stream(r, &desc)
            .await
            .map_err(|e| self.map_err(r, e))?;
        let total = stream.content_length.unwrap_or(layer.size);
        let mut w = self.inner.store.writer().map_err(|e| with_ref(e, &name))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                if let Some(oci_client::errors::DigestError::VerificationError {
                    expected,
                    actual,
                }) = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<oci_client::errors::DigestError>())
                {
                    OciError::DigestMismatch {
                        reference: name.clone(),
                        what: format!("layer {}", layer.digest),
                        expected: expected.clone(),
                        actual: actual.clone(),
                    }
                } else {
                    OciError::Unreachable {
                        reference: name.clone(),
                        cause: format!("downloading {}: {}", layer.digest, error_chain(&e)),
                    }
                }
            })?;
            if layer.size > 0 && w.size() + chunk.len() as u64 > layer.size {
                return Err(OciError::DigestMismatch {
                    reference: name,
                    what: format!("layer {} size", layer.digest),
                    expected: layer.size.to_string(),
                    actual: format!("more than {}", layer.size),
                });
            }
            w.write(&chunk).map_err(|e| with_ref(e, &name))?;
            progress.bytes(w.size(), total);
        }
        let size = w.size();
        let path = w
            .commit(&layer.digest, Some(layer.size).filter(|s| *s > 0), "layer")
            .map_err(|e| with_ref(e, &name))?;
        drop(_held);
        // Forget the per-digest lock once nobody else waits on it.
        let mut m = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) == 2 {
            m.remove(&layer.digest);
        }
        Ok((path, size))
    }

    /// [`Client::pull`] with a short bounded retry, for standalone `run`: errors
    /// that may be passing (not found yet, registry unreachable or failing) are
    /// retried `attempts - 1` more times, waiting `first_delay`, then twice as
    /// long each time; then the last error is returned. Errors no retry can fix
    /// (bad reference, not wasm, unauthorized, digest mismatch, `Never`) return at once.
    pub async fn pull_bounded(
        &self,
        r: &Reference,
        policy: PullPolicy,
        extra: Option<&Credentials>,
        attempts: u32,
        first_delay: Duration,
    ) -> Result<Pulled, OciError> {
        let mut backoff = Backoff::new(first_delay, first_delay * 8);
        let mut left = attempts.max(1);
        loop {
            match self.pull(r, policy, extra).await {
                Ok(p) => return Ok(p),
                Err(e)
                    if left > 1 && (e.is_transient() || matches!(e, OciError::NotFound { .. })) =>
                {
                    left -= 1;
                    let d = backoff.next_delay();
                    tracing::warn!(reference = %r, error = %e, retry_in = ?d, "pull failed; retrying");
                    tokio::time::sleep(d).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Publish a module (`.wasm`, or `.wat` text which is assembled first) as a
    /// CNCF wasm artifact and return the manifest digest. Pushing the same
    /// bytes twice gives the same digest.
    pub async fn push(
        &self,
        wasm: &Path,
        r: &Reference,
        progress: &dyn Progress,
    ) -> Result<String, OciError> {
        let name = r.to_string();
        let bad = |cause: String| OciError::BadFile {
            file: wasm.to_path_buf(),
            cause,
        };
        let raw = tokio::fs::read(wasm)
            .await
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let bytes = if wasm.extension().is_some_and(|e| e == "wat") {
            wat::parse_bytes(&raw)
                .map_err(|e| bad(format!("not valid WebAssembly text: {e}")))?
                .into_owned()
        } else {
            raw
        };
        if !bytes.starts_with(b"\0asm") {
            return Err(bad(
                "not a WebAssembly binary (no \\0asm header); push a .wasm (or .wat) file".into(),
            ));
        }
        let layer_digest = sha256_digest(&bytes);
        // The config describes the binary (module, or component with its imports/exports);
        // bytes neither module nor readable component are pushed as a plain wasm artifact.
        let kind = crate::wasm::describe(&bytes);
        if let crate::wasm::WasmKind::Unknown(why) = &kind {
            tracing::warn!(file = %wasm.display(), %why, "neither a core module nor a readable component; pushed without a component description");
        }
        let (manifest, config) = manifest::cncf_artifact(&kind, &layer_digest, bytes.len() as u64);
        let manifest_digest = sha256_digest(&manifest);
        let config_digest = sha256_digest(&config);
        if let Some(d) = r.digest()
            && d != manifest_digest
        {
            return Err(OciError::DigestMismatch {
                reference: name,
                what: "pushed manifest (the reference names a digest)".into(),
                expected: d.to_string(),
                actual: manifest_digest,
            });
        }
        let auth = to_registry_auth(self.inner.creds.lookup(r.registry()));
        let client = self.oci(r.resolve_registry(), &auth);
        progress.message(&format!("pushing {name}"));
        client
            .auth(r, &auth, RegistryOperation::Push)
            .await
            .map_err(|e| self.map_err(r, e))?;

        if !client
            .blob_exists(r, &config_digest)
            .await
            .map_err(|e| self.map_err(r, e))?
        {
            client
                .push_blob(r, config, &config_digest)
                .await
                .map_err(|e| self.map_err(r, e))?;
        }
        let total = bytes.len() as u64;
        if client
            .blob_exists(r, &layer_digest)
            .await
            .map_err(|e| self.map_err(r, e))?
        {
            progress.message(&format!("layer {layer_digest} already in the registry"));
        } else {
            progress.message(&format!("uploading {layer_digest}"));
            let done = Arc::new(AtomicU64::new(0));
            let counter = done.clone();
            let data = bytes::Bytes::from(bytes);
            let chunks: Vec<bytes::Bytes> = (0..data.len())
                .step_by(1 << 20)
                .map(|i| data.slice(i..(i + (1 << 20)).min(data.len())))
                .collect();
            let stream = futures::stream::iter(chunks).map(move |c| {
                counter.fetch_add(c.len() as u64, Ordering::Relaxed);
                Ok(c)
            });
            let fut = client.push_blob_stream(r, stream, &layer_digest, Some(total));
            tokio::pin!(fut);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    res = &mut fut => { res.map_err(|e| self.map_err(r, e))?; break; }
                    _ = tick.tick() => progress.bytes(done.load(Ordering::Relaxed), total),
                }
            }
        }
        progress.bytes(total, total);
        let ct = http::HeaderValue::from_static(manifest::OCI_MANIFEST);
        client
            .push_manifest_raw(r, manifest, ct)
            .await
            .map_err(|e| self.map_err(r, e))?;
        tracing::info!(reference = %name, %manifest_digest, %layer_digest, "pushed");
        Ok(manifest_digest)
    }

    /// [`Store::gc`], excluding this client's in-flight pulls (it waits for them).
    pub async fn gc(&self, keep: &HashSet<String>) -> Result<GcReport, OciError> {
        let _g = self.inner.gc_lock.write().await;
        let store = self.inner.store.clone();
        let keep = keep.clone();
        tokio::task::spawn_blocking(move || store.gc(&keep))
            .await
            .map_err(|e| OciError::io(self.inner.store.root(), std::io::Error::other(e)))?
    }
}

/// Exponential back-off. [`Backoff::kubelet`] is the kubelet's image pull
/// back-off (10 s doubling to 300 s), for the node agent's ImagePullBackOff.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// 10 s, 20 s, 40 s, … capped at 300 s, as the kubelet backs off image pulls.
    pub fn kubelet() -> Self {
        Self::new(Duration::from_secs(10), Duration::from_secs(300))
    }

    /// The delay before the next attempt (and double the one after, up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

fn with_ref(e: OciError, name: &str) -> OciError {
    match e {
        OciError::DigestMismatch {
            reference,
            what,
            expected,
            actual,
        } if reference.is_empty() => OciError::DigestMismatch {
            reference: name.to_string(),
            what,
            expected,
            actual,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_backoff() {
        let mut b = Backoff::kubelet();
        let secs: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 10);
    }

    #[test]
    fn transport_policy() {
        let dir = tempfile::tempdir().unwrap();
        let c = Client::new(
            Store::open(dir.path()).unwrap(),
            Credentials::default(),
            vec!["reg.lan:5000".into(), "other.lan".into()],
        );
        for r in [
            "localhost:5000",
            "127.0.0.1:41234",
            "127.1.2.3",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(c.plain_http(r), "{r}");
        }
        assert!(c.plain_http("reg.lan:5000"));
        assert!(!c.plain_http("reg.lan:5001"));
        assert!(c.plain_http("other.lan:8080"));
        assert!(!c.plain_http("docker.io"));
        assert!(!c.plain_http("ghcr.io"));
        assert!(!c.plain_http("10.0.0.1:5000"));
    }
}
