//! The kubelet API on `--port` over TLS: `/healthz`, and `/containerLogs/{ns}/{pod}/{container}`
//! for `kubectl logs`. Callers are authenticated by a client certificate of the cluster CA or a
//! bearer token (TokenReview), and authorized by SubjectAccessReview on `nodes/<subresource>`
//! as the kubelet does (401 unauthenticated, 403 unauthorized).
//!
//! The serving certificate starts self-signed and is replaced by one from a
//! `kubernetes.io/kubelet-serving` CSR once a cluster admin approves it (such CSRs are never
//! auto-approved: `kubectl certificate approve <csr>`, as for any kubelet).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use kube::api::{Api, PostParams};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::logs::{Cursor, LogOptions, send};
use crate::status::Statuses;

type Body = BoxBody<Bytes, Infallible>;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub groups: Vec<String>,
}

/// The serving certificate, swappable while serving.
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certified key from PEM certificate chain and PEM private key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>()?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// A self-signed serving certificate for the node's name and IP.
pub fn self_signed(node_name: &str, ip: IpAddr) -> anyhow::Result<Arc<CertifiedKey>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![node_name.to_string()])?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    let cert = params.self_signed(&key)?;
    certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
}

/// CN (user) and O (groups) of a DER client certificate.
pub fn cert_identity(der: &[u8]) -> Option<Caller> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok().map(String::from))
        .collect();
    Some(Caller { user, groups })
}

pub struct State {
    pub client: kube::Client,
    pub node_name: String,
    pub logs_root: PathBuf,
    pub statuses: Statuses,
    /// TokenReview and SubjectAccessReview answers, kept as the kubelet keeps them.
    pub auth: crate::authcache::AuthCache,
    /// The node's pods: their store, plans and supervisor (`/pods`, port-forward).
    pub pods: Arc<crate::pods::Context>,
    /// Resource usage for `/stats/summary` and `/metrics/resource`.
    pub stats: Arc<crate::stats::Stats>,
    /// The agent's Prometheus metrics, for `/metrics`.
    pub metrics: workload::metrics::Metrics,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn token_review(state: &State, token: &str) -> Result<Option<Caller>, String> {
    use crate::authcache::{TOKEN_TTL, cached, token_key};
    let auth = &state.auth;
    cached(
        &auth.tokens,
        &auth.in_flight,
        token_key(token),
        |_| TOKEN_TTL,
        || token_review_uncached(state, token),
    )
    .await
}

async fn token_review_uncached(state: &State, token: &str) -> Result<Option<Caller>, String> {
    let api: Api<TokenReview> = Api::all(state.client.clone());
    let tr: TokenReview = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token},
    }))
    .map_err(|e| e.to_string())?;
    let out = api
        .create(&PostParams::default(), &tr)
        .await
        .map_err(|e| format!("TokenReview: {e}"))?;
    let st = out.status.unwrap_or_default();
    if st.authenticated != Some(true) {
        return Ok(None);
    }
    let user = st.user.unwrap_or_default();
    Ok(Some(Caller {
        user: user.username.unwrap_or_default(),
        groups: user.groups.unwrap_or_default(),
    }))
}

/// The kubelet's mapping of a request to `nodes/<subresource>` attributes.
pub fn attributes(method: &Method, path: &str) -> (&'static str, &'static str) {
    let verb = match *method {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    // The kubelet's `isSubpath`: the prefix itself or a path beneath it (not `/statsfoo`).
    let beneath = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let sub = if beneath("/stats") {
        "stats"
    } else if beneath("/metrics") {
        "metrics"
    } else if beneath("/logs") {
        "log"
    } else if beneath("/spec") {
        "spec"
    } else {
        "proxy"
    };
    (verb, sub)
}

async fn authorize(
    state: &State,
    who: &Caller,
    verb: &'static str,
    sub: &'static str,
) -> Result<bool, String> {
    use crate::authcache::{ALLOWED_TTL, Attributes, DENIED_TTL, cached};
    let key = Attributes {
        user: who.user.clone(),
        groups: who.groups.clone(),
        verb,
        subresource: sub,
    };
    let ttl = |allowed: &bool| if *allowed { ALLOWED_TTL } else { DENIED_TTL };
    let auth = &state.auth;
    cached(&auth.decisions, &auth.in_flight, key, ttl, || {
        authorize_uncached(state, who, verb, sub)
    })
    .await
}

async fn authorize_uncached(
    state: &State,
    who: &Caller,
    verb: &str,
    sub: &str,
) -> Result<bool, String> {
    let api: Api<SubjectAccessReview> = Api::all(state.client.clone());
    let sar: SubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": who.user, "groups": who.groups,
            "resourceAttributes": {
                "verb": verb, "resource": "nodes", "subresource": sub, "name": state.node_name,
            },
        },
    }))
    .map_err(|e| e.to_string())?;
    let out = api
        .create(&PostParams::default(), &sar)
        .await
        .map_err(|e| format!("SubjectAccessReview: {e}"))?;
    Ok(out.status.is_some_and(|s| s.allowed))
}

async fn handle(state: Arc<State>, peer: Option<Caller>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let caller = match peer {
        Some(c) => Some(c),
        None => {
            let token = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match token {
                Some(t) if !t.is_empty() => match token_review(&state, t).await {
                    Ok(c) => c,
                    Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
                },
                _ => None,
            }
        }
    };
    let Some(caller) = caller else {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    let (verb, sub) = attributes(req.method(), &path);
    match authorize(&state, &caller, verb, sub).await {
        Ok(true) => {}
        Ok(false) => {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden (user={}, verb={verb}, resource=nodes, subresource={sub})",
                    caller.user
                ),
            );
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["containerLogs", ns, pod, container] if req.method() == Method::GET => {
            let query = req.uri().query().unwrap_or("");
            container_logs(&state, ns, pod, container, query).await
        }
        ["stats", "summary"] if req.method() == Method::GET => {
            crate::stats::summary_response(&state.stats).await
        }
        ["metrics", "resource"] if req.method() == Method::GET => {
            crate::stats::resource_response(&state.stats).await
        }
        ["metrics"] if req.method() == Method::GET => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(workload::metrics::CONTENT_TYPE),
            );
            r
        }
        ["pods"] if req.method() == Method::GET => crate::podapi::list(&state.pods),
        [kind @ ("exec" | "attach" | "run"), ns, pod, _]
        | [kind @ ("exec" | "attach" | "run"), ns, pod, _, _] => {
            use crate::podapi::Streaming;
            let what = match *kind {
                "exec" => Streaming::Exec,
                "attach" => Streaming::Attach,
                _ => Streaming::Run,
            };
            crate::podapi::refuse(&state.pods, &state.node_name, what, ns, pod)
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
            let (ns, pod, uid) = (
                ns.to_string(),
                pod.to_string(),
                parts.get(3).map(|u| u.to_string()),
            );
            crate::portforward::handle(&state.pods, req, &ns, &pod, uid.as_deref()).await
        }
        _ => text(StatusCode::NOT_FOUND, format!("404 page not found: {path}")),
    }
}

/// The current log file of a container of a pod this node runs (or ran, while its logs are
/// kept): `<container>.log`, or with `previous` `<container>.log.previous`.
async fn log_path(
    state: &State,
    ns: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> Option<PathBuf> {
    let key = match state.statuses.find(ns, pod) {
        Some(k) => k,
        None => {
            // A pod whose status is no longer kept (e.g. after an agent restart): find its folder.
            let prefix = format!("{ns}_{pod}_");
            let root = state.logs_root.clone();
            let uid = tokio::task::spawn_blocking(move || {
                std::fs::read_dir(root)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .find_map(|n| n.strip_prefix(&prefix).map(String::from))
            })
            .await
            .ok()??;
            workload::PodKey {
                namespace: ns.into(),
                name: pod.into(),
                uid,
            }
        }
    };
    let dir = state
        .logs_root
        .join(format!("{}_{}_{}", key.namespace, key.name, key.uid));
    Some(if previous {
        dir.join(format!("{container}.log.previous"))
    } else {
        dir.join(format!("{container}.log"))
    })
}

async fn container_logs(
    state: &Arc<State>,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
) -> Response<Body> {
    let opts = match LogOptions::parse(query, SystemTime::now()) {
        Ok(o) => o,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let Some(path) = log_path(state, ns, pod, container, opts.previous).await else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} is not on node {}", state.node_name),
        );
    };
    let tail = opts.tail_lines;
    let opened = tokio::task::spawn_blocking(move || Cursor::open(&path, tail)).await;
    let cursor = match opened {
        Ok(Ok(c)) if !(c.is_empty() && opts.previous) => c,
        Ok(Ok(_)) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            );
        }
        Ok(Err(e)) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no logs for container {container} of pod {ns}/{pod}: {e}"),
            );
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    // What is there (from tailLines on), then with `follow` new complete lines as they are
    // written, until the client goes away, the limit is reached, or the pod is gone.
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let state = state.clone();
    let (ns, pod) = (ns.to_string(), pod.to_string());
    tokio::spawn(send(cursor, opts, tx, move || {
        state.statuses.find(&ns, &pod).is_none()
    }));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves the kubelet API on `listener` until the task is aborted. Connections are bounded by
/// `limits` ([`workload::listen`]): at most `max_connections` (the oldest idle one makes room
/// for a new one), a TLS handshake within `handshake_timeout`, a request head within
/// `header_timeout`, and no connection idle longer than `idle_timeout`.
pub async fn serve(
    listener: TcpListener,
    cert: Arc<CertSlot>,
    client_ca: Vec<Vec<u8>>,
    state: Arc<State>,
    limits: workload::listen::ConnLimits,
) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for der in client_ca {
        roots.add(CertificateDer::from(der))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let conns = workload::listen::Conns::new(limits);
    loop {
        let (tcp, peer_addr): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("kubelet API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(conn) = conns.admit() else {
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let conn = Arc::new(conn);
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer_addr, "kubelet API TLS handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer_addr, "kubelet API TLS handshake timed out");
                        return;
                    }
                },
                _ = conn.closed() => return,
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| cert_identity(c.as_ref()));
            let in_conn = conn.clone();
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let peer = peer.clone();
                let busy = in_conn.request();
                async move {
                    let resp = handle(state, peer, req).await;
                    // A streamed body (`kubectl logs -f`) keeps the connection busy while it runs.
                    Ok::<_, Infallible>(resp.map(|b| {
                        BodyExt::boxed(Busy {
                            body: b,
                            _busy: busy,
                        })
                    }))
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            tokio::select! {
                r = served => if let Err(e) = r {
                    tracing::debug!(%peer_addr, "kubelet API connection: {e}");
                },
                _ = conn.closed() => {}
            }
        });
    }
}

/// A response body that keeps its connection marked busy until it has been sent.
struct Busy {
    body: Body,
    _busy: workload::listen::InFlight,
}

impl hyper::body::Body for Busy {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Requests a `kubelet-serving` certificate and installs it in `slot` once issued (waits as
/// long as it takes: an admin must approve it), then renews it the same way before it expires
/// (at a jittered 70–90% of its lifetime, or `renew_after` after it was installed). Never
/// returns; until a certificate is issued the slot keeps what it has.
pub async fn rotate_serving_cert(
    client: kube::Client,
    node_name: String,
    node_ip: IpAddr,
    slot: Arc<CertSlot>,
    renew_after: Option<std::time::Duration>,
) {
    let mut backoff = std::time::Duration::from_secs(5);
    loop {
        let result = async {
            let (csr, key) = crate::bootstrap::node_csr(
                &node_name,
                std::slice::from_ref(&node_name),
                &[node_ip],
            )?;
            let cert = crate::bootstrap::request_certificate(
                client.clone(),
                "kubernetes.io/kubelet-serving",
                &["digital signature", "server auth"],
                &csr,
                &format!("node-serving-{node_name}-"),
                None,
            )
            .await?;
            let validity = crate::bootstrap::cert_validity(&cert)?;
            Ok::<_, anyhow::Error>((certified_key(&cert, key.as_bytes())?, validity))
        }
        .await;
        match result {
            Ok((k, (not_before, not_after, _))) => {
                slot.set(k);
                backoff = std::time::Duration::from_secs(5);
                let wait = crate::bootstrap::renewal_delay(not_before, not_after, renew_after);
                tracing::info!(
                    "kubelet API now serves the cluster-signed certificate; renewing it in \
                     {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                tracing::warn!(
                    "serving certificate: {e:#}; keeping the current one, retrying in {backoff:?}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(300));
            }
        }
    }
}

pub fn cert_slot(initial: Arc<CertifiedKey>) -> Arc<CertSlot> {
    Arc::new(CertSlot(RwLock::new(initial)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_paths_like_the_kubelet() {
        assert_eq!(
            attributes(&Method::GET, "/containerLogs/a/b/c"),
            ("get", "proxy")
        );
        assert_eq!(attributes(&Method::GET, "/stats/summary"), ("get", "stats"));
        assert_eq!(
            attributes(&Method::POST, "/exec/a/b/c"),
            ("create", "proxy")
        );
    }

    #[test]
    fn self_signed_cert_and_identity() {
        let k = self_signed("n1", "127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(k.cert.len(), 1);
        // rcgen's default subject is CN=rcgen self signed cert.
        let who = cert_identity(k.cert[0].as_ref()).unwrap();
        assert!(!who.user.is_empty());
    }
}
