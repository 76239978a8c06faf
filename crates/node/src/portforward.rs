//! `kubectl port-forward` on the kubelet API: `/portForward/{namespace}/{pod}` (and
//! `/portForward/{namespace}/{pod}/{uid}`), the server side of the protocol the API server
//! speaks to kubelets.
//!
//! What reaches a kubelet is always SPDY/3.1 (`Upgrade: SPDY/3.1`,
//! `X-Stream-Protocol-Version: portforward.k8s.io`): a client speaking SPDY to the API server is
//! proxied as it is, and a client speaking WebSocket (`SPDY/3.1+portforward.k8s.io`, kubectl's
//! default since 1.31) is unwrapped by the API server's tunneling handler
//! (k8s.io/apiserver/pkg/util/proxy/streamtunnel.go, `createSPDYRequest`), which upgrades to the
//! kubelet with SPDY/3.1 and carries the SPDY bytes inside WebSocket messages to the client.
//! Each forwarded connection is a pair of streams with the same `requestID` header: `streamType:
//! error` (the node writes why a forward failed, then closes it) and `streamType: data` (the
//! bytes of one TCP connection to `port` of the pod), as the kubelet's
//! pkg/cri/streaming/portforward/httpstream.go pairs them.
//!
//! A client that upgrades to WebSocket with another protocol than the tunneling one (e.g.
//! `v4.channel.k8s.io`, as the Python client does) reaches the node unchanged, and is served
//! the kubelet's WebSocket protocol (pkg/cri/streaming/portforward/websocket.go: `?port=`, a
//! data and an error channel per port), see [`WS_BINARY`].
//!
//! The pod's port: a WAGI pod's listener (`default-host`), or an HTTP component's
//! `containerPort`s (8080 without one), as the pod's plan says; any other port is refused on the
//! error stream with the ports the pod does serve. Flow control: like spdystream (which never
//! sends WINDOW_UPDATE), windows are not enforced; TCP's back-pressure bounds what is buffered.
//!
//! Bounds: [`MAX_SESSIONS`] port-forward connections on the node (an upgraded connection leaves
//! the kubelet API's connection cap, so this one bounds them) and [`MAX_STREAMS`] open
//! streams on each, [`STREAM_CREATION_TIMEOUT`] for a pair to be complete, queues of
//! [`TO_POD_QUEUE`] chunks per connection and [`WRITE_QUEUE`] frames per session, a write to
//! the client that makes no progress for [`WRITE_STALL`] ends the session, as does no frame
//! either way for [`IDLE_TIMEOUT`] (the kubelet's default `streamingConnectionIdleTimeout`). When
//! the client goes away or the pod stops, every connection to the pod of that session is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use workload::PodKey;
use workload::plan::PlanKind;

use crate::spdy::{self, Decoder, Encoder, FLAG_FIN, Frame};

type Body = BoxBody<Bytes, Infallible>;

/// The port-forward subprotocol (`X-Stream-Protocol-Version`).
pub const PROTOCOL: &str = "portforward.k8s.io";
/// Port-forward connections served at once by the node; beyond it the upgrade is refused (429).
pub const MAX_SESSIONS: usize = 32;
/// Streams open at once on one connection (two per forwarded TCP connection); a stream beyond
/// it is refused (RST_STREAM REFUSED_STREAM).
pub const MAX_STREAMS: usize = 128;
/// Time for the second stream of a pair to arrive (the kubelet's default).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// No frame either way for this long ends the session (the kubelet's default
/// `streamingConnectionIdleTimeout`; kubectl pings every 5 s while it runs).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// A write to the client that makes no progress this long ends the session.
pub const WRITE_STALL: Duration = Duration::from_secs(60);
/// Time to connect to the pod's port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks from the client waiting for the pod to read them, per forwarded connection.
pub const TO_POD_QUEUE: usize = 16;
/// Frames waiting to be written to the client, per session.
pub const WRITE_QUEUE: usize = 64;
/// Largest read from the pod sent as one data frame.
const CHUNK: usize = 32 << 10;
/// How often a session looks at its pod, its pairs' deadlines and its idle time.
const TICK: Duration = Duration::from_millis(500);

static SESSIONS: Semaphore = Semaphore::const_new(MAX_SESSIONS);

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The addresses `pod` serves on, as its plan says: a WAGI pod's listener, or each HTTP
/// component's ports. An unspecified address (`0.0.0.0:3000`) is reached on loopback.
pub fn served(pod: &Pod, ctx: &workload::PlanContext) -> Vec<SocketAddr> {
    // Only what decides the addresses: the annotations, the containers' names, images and
    // ports, hostNetwork (env and volumes need the API objects resolved first, and do not
    // matter here).
    let mut bare = Pod {
        metadata: pod.metadata.clone(),
        ..Default::default()
    };
    if let Some(spec) = &pod.spec {
        let containers = spec
            .containers
            .iter()
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name.clone(),
                image: c.image.clone(),
                ports: c.ports.clone(),
                ..Default::default()
            })
            .collect();
        bare.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            containers,
            host_network: spec.host_network,
            ..Default::default()
        });
    }
    let plan = match workload::plan::plan(&bare, ctx) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!("port-forward: no plan for the pod's ports: {e}");
            return vec![];
        }
    };
    let mut addrs: Vec<SocketAddr> = match &plan.kind {
        PlanKind::Wagi { listen, .. } => vec![*listen],
        PlanKind::Wasi { .. } => plan
            .containers
            .iter()
            .flat_map(|c| c.listen.iter().copied())
            .collect(),
    };
    for a in &mut addrs {
        if a.ip().is_unspecified() {
            a.set_ip(match a.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
    }
    addrs.dedup();
    addrs
}

/// What a session forwards to.
struct Target {
    key: PodKey,
    addrs: Vec<SocketAddr>,
}

impl Target {
    fn addr(&self, port: u16) -> Result<SocketAddr, String> {
        self.addrs
            .iter()
            .find(|a| a.port() == port)
            .copied()
            .ok_or_else(|| {
                let ports: Vec<String> = self.addrs.iter().map(|a| a.port().to_string()).collect();
                format!(
                    "pod {}/{} does not serve port {port} (a WebAssembly pod is reached only \
                     on the ports it serves: {})",
                    self.key.namespace,
                    self.key.name,
                    if ports.is_empty() {
                        "none".to_string()
                    } else {
                        ports.join(", ")
                    }
                )
            })
    }
}

/// Whether the request asks to upgrade to SPDY/3.1.
fn is_spdy_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name: http::header::HeaderName, want: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains(want))
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, "spdy/3.1")
}

/// Protocols the client offers in `X-Stream-Protocol-Version` (comma-separated, repeatable).
fn offered<B>(req: &Request<B>) -> Vec<String> {
    req.headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Answers `/portForward/{ns}/{name}[/{uid}]`: checks the upgrade (SPDY/3.1, or the kubelet's
/// WebSocket protocol), finds the pod among those this node runs, answers 101 and serves the
/// session on the upgraded connection.
pub async fn handle(
    pods: &Arc<crate::pods::Context>,
    req: Request<Incoming>,
    ns: &str,
    name: &str,
    uid: Option<&str>,
) -> Response<Body> {
    if is_websocket_upgrade(&req) {
        return handle_websocket(pods, req, ns, name, uid);
    }
    if !is_spdy_upgrade(&req) {
        return text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: port-forward needs a SPDY/3.1 upgrade (Connection: Upgrade, \
             Upgrade: SPDY/3.1) or a WebSocket one",
        );
    }
    let protocols = offered(&req);
    if protocols.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: X-Stream-Protocol-Version is required",
        );
    }
    if !protocols.iter().any(|p| p == PROTOCOL) {
        let mut r = text(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {protocols:?}, \
                 server accepts [\"{PROTOCOL}\"]"
            ),
        );
        r.headers_mut().insert(
            "x-accepted-stream-protocol-versions",
            HeaderValue::from_static(PROTOCOL),
        );
        return r;
    }
    let (target, permit) = match admit(pods, ns, name, uid) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let upgrade = hyper::upgrade::on(req);
    let pods = pods.clone();
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(io) => {
                tracing::debug!(pod = %target.key, "port-forward session (SPDY/3.1)");
                let running = move |k: &PodKey| pods.sup.running().contains(k);
                serve(TokioIo::new(io), target, running).await;
            }
            Err(e) => tracing::debug!("port-forward upgrade: {e}"),
        }
    });
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(PROTOCOL),
    );
    r
}

/// The pod `ns/name` (of `uid` if given) among those this node runs, and a session slot.
#[allow(clippy::result_large_err)]
fn admit(
    pods: &crate::pods::Context,
    ns: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<(Target, tokio::sync::SemaphorePermit<'static>), Response<Body>> {
    let pod = pods.store.get().and_then(|s| {
        s.state().into_iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && p.metadata.name.as_deref() == Some(name)
                && uid.is_none_or(|u| p.metadata.uid.as_deref() == Some(u))
        })
    });
    let Some(pod) = pod else {
        return Err(text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{name} does not exist on this node"),
        ));
    };
    let key = workload::plan::pod_key(&pod);
    if !pods.sup.running().contains(&key) {
        return Err(text(
            StatusCode::BAD_REQUEST,
            format!("pod {ns}/{name} is not running on this node"),
        ));
    }
    let Ok(permit) = SESSIONS.try_acquire() else {
        return Err(text(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this node serves {MAX_SESSIONS} port-forward connections at most; try again"),
        ));
    };
    Ok((
        Target {
            addrs: served(&pod, &pods.plan),
            key,
        },
        permit,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Error,
}

/// The two streams of one forwarded connection.
struct Pair {
    data: Option<u32>,
    error: Option<u32>,
    port: u16,
    created: Instant,
    /// What the client sends on the data stream, to the pod (dropped: the client closed it).
    to_pod: Option<mpsc::Sender<Bytes>>,
    task: Option<AbortHandle>,
}

/// A session's state, owned by its reader loop.
struct Session {
    target: Target,
    out: mpsc::Sender<Frame>,
    streams: HashMap<u32, (String, Kind)>,
    pairs: HashMap<String, Pair>,
    tasks: JoinSet<(String, Result<(), String>)>,
    last_stream: u32,
    gone_away: bool,
}

/// Milliseconds since `epoch` of the session's last frame, read or written.
#[derive(Clone)]
struct Activity {
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Serves one SPDY/3.1 port-forward session on `io` until the client goes away, the session
/// is idle or stalled, or `running(pod)` says the pod stopped.
async fn serve<IO>(io: IO, target: Target, running: impl Fn(&PodKey) -> bool)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (out, frames) = mpsc::channel::<Frame>(WRITE_QUEUE);
    let activity = Activity {
        epoch: Instant::now(),
        last: Arc::default(),
    };
    let writer = tokio::spawn(write_frames(wr, frames, activity.clone()));
    let mut s = Session {
        target,
        out,
        streams: HashMap::new(),
        pairs: HashMap::new(),
        tasks: JoinSet::new(),
        last_stream: 0,
        gone_away: false,
    };
    let mut decoder = Decoder::default();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut tick = tokio::time::interval(TICK);
    let why: String = 'session: loop {
        tokio::select! {
            n = rd.read_buf(&mut buf) => {
                match n {
                    Ok(0) => break 'session "the client closed the connection".into(),
                    Ok(_) => {}
                    Err(e) => break 'session format!("reading from the client: {e}"),
                }
                activity.touch();
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(frame)) => s.on_frame(frame).await,
                        Ok(None) => break,
                        Err(e) => {
                            let _ = s.out.send(Frame::GoAway {
                                last_good_stream_id: s.last_stream,
                                status: spdy::goaway::PROTOCOL_ERROR,
                            }).await;
                            break 'session e.to_string();
                        }
                    }
                }
                if s.gone_away && s.pairs.is_empty() {
                    break 'session "the client said GOAWAY".into();
                }
            }
            Some(done) = s.tasks.join_next() => {
                if let Ok((rid, result)) = done {
                    s.finish(&rid, result).await;
                }
                if s.gone_away && s.pairs.is_empty() {
                    break 'session "the client said GOAWAY".into();
                }
            }
            _ = tick.tick() => {
                if !running(&s.target.key) {
                    let msg = format!("pod {}/{} stopped", s.target.key.namespace, s.target.key.name);
                    let rids: Vec<String> = s.pairs.keys().cloned().collect();
                    for rid in rids {
                        s.finish(&rid, Err(msg.clone())).await;
                    }
                    let _ = s.out.send(Frame::GoAway {
                        last_good_stream_id: s.last_stream,
                        status: spdy::goaway::OK,
                    }).await;
                    break 'session msg;
                }
                if activity.idle() >= IDLE_TIMEOUT {
                    break 'session format!("idle for {IDLE_TIMEOUT:?}");
                }
                s.expire().await;
                if writer.is_finished() {
                    break 'session "writing to the client failed".into();
                }
            }
        }
    };
    tracing::debug!(pod = %s.target.key, "port-forward session ends: {why}");
    // Every connection to the pod closes with its task; the writer sends what was queued (the
    // GOAWAY, error messages) within WRITE_STALL, then closes the connection.
    s.tasks.abort_all();
    drop(s);
    let _ = tokio::time::timeout(WRITE_STALL, writer).await;
}

/// Writes queued frames to the client, several per write when they are there.
async fn write_frames<W: AsyncWrite>(wr: W, mut frames: mpsc::Receiver<Frame>, activity: Activity) {
    let mut wr = std::pin::pin!(wr);
    let mut encoder = Encoder::default();
    let mut buf = BytesMut::with_capacity(64 << 10);
    while let Some(first) = frames.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(f) = next {
            if let Err(e) = encoder.encode(&f, &mut buf) {
                tracing::debug!("port-forward: {e}");
                return;
            }
            next = if buf.len() < CHUNK {
                frames.try_recv().ok()
            } else {
                None
            };
        }
        match tokio::time::timeout(WRITE_STALL, wr.write_all(&buf)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        if tokio::time::timeout(WRITE_STALL, wr.flush()).await.is_err() {
            return;
        }
        activity.touch();
    }
    let _ = tokio::time::timeout(WRITE_STALL, wr.shutdown()).await;
}

impl Session {
    async fn send(&self, f: Frame) {
        // A closed writer ends the session at the next tick.
        let _ = self.out.send(f).await;
    }

    async fn reset(&self, stream_id: u32, status: u32) {
        self.send(Frame::RstStream { stream_id, status }).await;
    }

    async fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => self.on_stream(stream_id, flags, &headers).await,
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let Some((rid, kind)) = self.streams.get(&stream_id).cloned() else {
                    return;
                };
                if kind != Kind::Data {
                    return; // the client only closes its side of the error stream
                }
                let Some(pair) = self.pairs.get_mut(&rid) else {
                    return;
                };
                if !data.is_empty()
                    && let Some(tx) = &pair.to_pod
                    && tx.send(data).await.is_err()
                {
                    pair.to_pod = None;
                }
                if flags & FLAG_FIN != 0 {
                    pair.to_pod = None;
                }
            }
            Frame::RstStream { stream_id, .. } => {
                let Some((rid, _)) = self.streams.get(&stream_id).cloned() else {
                    return;
                };
                // The client is done with this connection (kubectl resets the data stream once
                // the pod's side has ended): close it, and the error stream with nothing said.
                if let Some(p) = self.pairs.get_mut(&rid)
                    && let Some(t) = p.task.take()
                {
                    t.abort();
                }
                self.streams.remove(&stream_id);
                self.finish(&rid, Ok(())).await;
            }
            Frame::Ping { id } => {
                // The client's pings have odd ids (ours would be even): answer them.
                if id & 1 == 1 {
                    self.send(Frame::Ping { id }).await;
                }
            }
            Frame::GoAway { .. } => self.gone_away = true,
            // No flow control (as spdystream), nothing to do with the rest.
            Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Headers { .. }
            | Frame::SynReply { .. }
            | Frame::Unknown { .. } => {}
        }
    }

    async fn on_stream(&mut self, stream_id: u32, flags: u8, headers: &spdy::Headers) {
        if stream_id.is_multiple_of(2) || stream_id <= self.last_stream {
            self.reset(stream_id, spdy::rst::PROTOCOL_ERROR).await;
            return;
        }
        self.last_stream = stream_id;
        if self.gone_away || self.streams.len() >= MAX_STREAMS {
            self.reset(stream_id, spdy::rst::REFUSED_STREAM).await;
            return;
        }
        // As the kubelet's httpStreamReceived: a port and a stream type, or the stream is reset.
        let port = spdy::header(headers, "port").and_then(|p| p.parse::<u16>().ok());
        let kind = match spdy::header(headers, "streamtype") {
            Some("data") => Some(Kind::Data),
            Some("error") => Some(Kind::Error),
            _ => None,
        };
        let (Some(port), Some(kind)) = (port.filter(|p| *p > 0), kind) else {
            tracing::debug!(stream_id, ?headers, "port-forward stream refused");
            self.reset(stream_id, spdy::rst::CANCEL).await;
            return;
        };
        let rid = match spdy::header(headers, "requestid") {
            Some(r) if !r.is_empty() => r.to_string(),
            // Clients before requestID: the error stream first, the data stream next.
            _ => match kind {
                Kind::Error => stream_id.to_string(),
                Kind::Data => stream_id.saturating_sub(2).to_string(),
            },
        };
        let pair = self.pairs.entry(rid.clone()).or_insert_with(|| Pair {
            data: None,
            error: None,
            port,
            created: Instant::now(),
            to_pod: None,
            task: None,
        });
        let slot = match kind {
            Kind::Data => &mut pair.data,
            Kind::Error => &mut pair.error,
        };
        if slot.is_some() || pair.port != port {
            self.reset(stream_id, spdy::rst::PROTOCOL_ERROR).await;
            return;
        }
        *slot = Some(stream_id);
        self.streams.insert(stream_id, (rid.clone(), kind));
        self.send(Frame::SynReply {
            stream_id,
            flags: 0,
            headers: vec![],
        })
        .await;
        let Some(pair) = self.pairs.get_mut(&rid) else {
            return;
        };
        if let (Some(data), Some(_)) = (pair.data, pair.error) {
            let (tx, rx) = mpsc::channel(TO_POD_QUEUE);
            // A data stream opened with FIN sends nothing to the pod.
            let client_done = kind == Kind::Data && flags & FLAG_FIN != 0;
            pair.to_pod = (!client_done).then_some(tx);
            let addr = self.target.addr(port);
            let out = self.out.clone();
            let task = self.tasks.spawn(async move {
                let r = forward(addr, rx, Out::Spdy { out, stream: data }).await;
                (rid, r)
            });
            pair.task = Some(task);
        }
    }

    /// Ends a pair: says `result`'s error on its error stream, closes that stream, resets the
    /// data stream if the forward failed, and forgets both.
    async fn finish(&mut self, rid: &str, result: Result<(), String>) {
        let Some(mut pair) = self.pairs.remove(rid) else {
            return;
        };
        if let Some(t) = pair.task.take() {
            t.abort();
        }
        if let Some(err) = pair.error {
            if let Err(msg) = &result {
                tracing::debug!(pod = %self.target.key, port = pair.port, "port-forward: {msg}");
                let text = format!(
                    "error forwarding port {} to pod {}, uid {}: {msg}",
                    pair.port, self.target.key.name, self.target.key.uid
                );
                self.send(Frame::Data {
                    stream_id: err,
                    flags: 0,
                    data: Bytes::from(text),
                })
                .await;
            }
            self.send(Frame::Data {
                stream_id: err,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await;
            self.streams.remove(&err);
        }
        if let Some(data) = pair.data {
            if result.is_err() && self.streams.contains_key(&data) {
                self.reset(data, spdy::rst::CANCEL).await;
            }
            self.streams.remove(&data);
        }
    }

    /// Pairs whose second stream did not come in time: said on the error stream, as the
    /// kubelet does.
    async fn expire(&mut self) {
        let late: Vec<String> = self
            .pairs
            .iter()
            .filter(|(_, p)| p.task.is_none() && p.created.elapsed() >= STREAM_CREATION_TIMEOUT)
            .map(|(r, _)| r.clone())
            .collect();
        for rid in late {
            let msg = format!("timed out waiting for the streams of request {rid}");
            self.finish(&rid, Err(msg)).await;
        }
    }
}

/// One forwarded connection: connects to `addr`, copies what the client sends (`from_client`)
/// to the pod and what the pod sends to the client's data stream, until the pod closes its side
/// (then FIN on the data stream). An error before the connection is made is returned, to be
/// said on the error stream; a connection that ends with an error later is only closed.
async fn forward(
    addr: Result<SocketAddr, String>,
    mut from_client: mpsc::Receiver<Bytes>,
    out: Out,
) -> Result<(), String> {
    let addr = addr?;
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("dial tcp {addr}: {e}")),
        Err(_) => return Err(format!("dial tcp {addr}: no answer in {CONNECT_TIMEOUT:?}")),
    };
    let _ = tcp.set_nodelay(true);
    let (mut from_pod, mut to_pod) = tcp.into_split();
    // Ends only if writing to the pod fails.
    let up = async move {
        while let Some(chunk) = from_client.recv().await {
            if to_pod.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The client closed its side: so does the pod's connection, for writing.
        let _ = to_pod.shutdown().await;
        // Keep the write half (and so the connection) until the pod has finished.
        std::future::pending::<()>().await;
    };
    let reset = out.clone();
    let down = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !out.data(Bytes::copy_from_slice(&buf[..n])).await {
                        return;
                    }
                }
            }
        }
        out.end().await;
    };
    tokio::select! {
        _ = up => reset.reset().await,
        _ = down => {}
    }
    Ok(())
}

/// Where a forwarded connection's bytes from the pod go.
#[derive(Clone)]
enum Out {
    /// A SPDY data stream.
    Spdy {
        out: mpsc::Sender<Frame>,
        stream: u32,
    },
    /// A WebSocket data channel.
    WebSocket {
        out: mpsc::Sender<(u8, Bytes)>,
        channel: u8,
    },
}

impl Out {
    /// False once the session is gone.
    async fn data(&self, data: Bytes) -> bool {
        match self {
            Out::Spdy { out, stream } => out
                .send(Frame::Data {
                    stream_id: *stream,
                    flags: 0,
                    data,
                })
                .await
                .is_ok(),
            Out::WebSocket { out, channel } => out.send((*channel, data)).await.is_ok(),
        }
    }

    /// The pod closed its side (FIN on a SPDY stream; a WebSocket channel has no such thing).
    async fn end(&self) {
        if let Out::Spdy { out, stream } = self {
            let _ = out
                .send(Frame::Data {
                    stream_id: *stream,
                    flags: FLAG_FIN,
                    data: Bytes::new(),
                })
                .await;
        }
    }

    /// The connection to the pod broke while the client still sends.
    async fn reset(&self) {
        if let Out::Spdy { out, stream } = self {
            let _ = out
                .send(Frame::RstStream {
                    stream_id: *stream,
                    status: spdy::rst::CANCEL,
                })
                .await;
        }
    }
}

// --- The kubelet's WebSocket port-forward protocol -------------------------------------------
//
// A client that upgrades to WebSocket with a protocol other than the tunneling one (for example
// `v4.channel.k8s.io`, as the Python client does) is proxied to the node as it is, and the
// kubelet serves it (pkg/cri/streaming/portforward/websocket.go): the ports come from `?port=`,
// port i has data channel 2i and error channel 2i+1, each message starts with its channel
// number (one byte; a '0'-based digit and base64 text under `v4.base64.channel.k8s.io`), and the
// first message on each channel is the port, 2 bytes little-endian. One TCP connection per port
// for the session's life; the session ends when every port's connection has ended.

/// Binary channels.
pub const WS_BINARY: &str = "v4.channel.k8s.io";
/// Base64 text channels.
pub const WS_BASE64: &str = "v4.base64.channel.k8s.io";
/// Ports of one WebSocket session at most (channel numbers are one byte).
pub const MAX_WS_PORTS: usize = MAX_STREAMS / 2;
/// Largest WebSocket message accepted from a client.
const MAX_WS_MESSAGE: usize = 1 << 20;

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name: http::header::HeaderName, want: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains(want))
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, "websocket")
}

/// The ports of `?port=A&port=B,C`, as the kubelet's `NewV4Options` reads them.
fn ws_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (k, v) in query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
    {
        if k != "port" {
            continue;
        }
        if v.is_empty() {
            return Err("query parameter \"port\" cannot be empty".into());
        }
        let v = v.replace("%2C", ",").replace("%2c", ",");
        for p in v.split(',') {
            let port: u16 = p
                .parse()
                .map_err(|_| format!("unable to parse {v:?} as a port"))?;
            if port == 0 {
                return Err(format!("port {v:?} must be > 0"));
            }
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    if ports.len() > MAX_WS_PORTS {
        return Err(format!(
            "{} ports asked for; one connection forwards {MAX_WS_PORTS} at most",
            ports.len()
        ));
    }
    Ok(ports)
}

/// The protocol to answer with: none when the client offers none (binary channels), else the
/// first offered that the kubelet speaks.
fn ws_protocol<B>(req: &Request<B>) -> Result<Option<&'static str>, String> {
    let offered: Vec<String> = req
        .headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|p| [WS_BINARY, WS_BASE64].into_iter().find(|s| s == p))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "requested protocol(s) are not supported: {offered:?}; supports [\"{WS_BINARY}\", \"{WS_BASE64}\"]"
            )
        })
}

fn handle_websocket(
    pods: &Arc<crate::pods::Context>,
    req: Request<Incoming>,
    ns: &str,
    name: &str,
    uid: Option<&str>,
) -> Response<Body> {
    let Some(key) = req
        .headers()
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec())
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: no Sec-WebSocket-Key",
        );
    };
    let ports = match ws_ports(req.uri().query().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let protocol = match ws_protocol(&req) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let (target, permit) = match admit(pods, ns, name, uid) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let upgrade = hyper::upgrade::on(req);
    let pods = pods.clone();
    let base64 = protocol == Some(WS_BASE64);
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(io) => {
                tracing::debug!(pod = %target.key, ?ports, "port-forward session (WebSocket)");
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_WS_MESSAGE))
                    .max_frame_size(Some(MAX_WS_MESSAGE));
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(config))
                        .await;
                let running = move |k: &PodKey| pods.sup.running().contains(k);
                serve_websocket(ws, target, ports, base64, running).await;
            }
            Err(e) => tracing::debug!("port-forward upgrade: {e}"),
        }
    });
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(&key)) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(p) = protocol {
        h.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(p),
        );
    }
    r
}

/// One message on `channel`, framed as the negotiated protocol wants.
fn ws_message(channel: u8, data: &[u8], base64: bool) -> Message {
    if base64 {
        use base64::Engine as _;
        let mut t = String::with_capacity(1 + data.len() * 4 / 3 + 4);
        t.push(char::from(b'0' + channel));
        t.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
        Message::text(t)
    } else {
        let mut b = Vec::with_capacity(1 + data.len());
        b.push(channel);
        b.extend_from_slice(data);
        Message::binary(b)
    }
}

/// A channel and its payload from a client message, if it carries one.
fn ws_payload(m: Message, base64: bool) -> Option<(u8, Bytes)> {
    match m {
        Message::Binary(b) if !base64 && !b.is_empty() => Some((b[0], b.slice(1..))),
        Message::Text(t) if base64 && !t.is_empty() => {
            use base64::Engine as _;
            let t = t.as_str();
            let channel = t.as_bytes()[0].checked_sub(b'0')?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(&t[1..])
                .ok()?;
            Some((channel, Bytes::from(data)))
        }
        _ => None,
    }
}

/// Serves one WebSocket port-forward session: a connection to each port, until every one has
/// ended, the client goes away, the session is idle, or the pod stops.
async fn serve_websocket<S>(
    ws: WebSocketStream<S>,
    target: Target,
    ports: Vec<u16>,
    base64: bool,
    running: impl Fn(&PodKey) -> bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures::{SinkExt, StreamExt};
    let (mut sink, mut stream) = ws.split();
    let (out, mut queue) = mpsc::channel::<(u8, Bytes)>(WRITE_QUEUE);
    let activity = Activity {
        epoch: Instant::now(),
        last: Arc::default(),
    };
    let wrote = activity.clone();
    let writer = tokio::spawn(async move {
        while let Some((channel, data)) = queue.recv().await {
            let m = ws_message(channel, &data, base64);
            match tokio::time::timeout(WRITE_STALL, sink.send(m)).await {
                Ok(Ok(())) => wrote.touch(),
                _ => return,
            }
        }
        let _ = tokio::time::timeout(WRITE_STALL, sink.close()).await;
    });
    let mut to_pod = Vec::with_capacity(ports.len());
    let mut tasks: JoinSet<(usize, Result<(), String>)> = JoinSet::new();
    for (i, port) in ports.iter().enumerate() {
        let data = (2 * i) as u8;
        // As the kubelet: the port first, on both channels.
        let _ = out
            .send((data, Bytes::copy_from_slice(&port.to_le_bytes())))
            .await;
        let _ = out
            .send((data + 1, Bytes::copy_from_slice(&port.to_le_bytes())))
            .await;
        let (tx, rx) = mpsc::channel(TO_POD_QUEUE);
        to_pod.push(Some(tx));
        let addr = target.addr(*port);
        let sink = Out::WebSocket {
            out: out.clone(),
            channel: data,
        };
        tasks.spawn(async move { (i, forward(addr, rx, sink).await) });
    }
    let mut left = ports.len();
    let mut tick = tokio::time::interval(TICK);
    let why: String = loop {
        tokio::select! {
            m = stream.next() => {
                let m = match m {
                    Some(Ok(Message::Close(_))) | None => break "the client closed the connection".into(),
                    Some(Err(e)) => break format!("reading from the client: {e}"),
                    Some(Ok(m)) => m,
                };
                activity.touch();
                let Some((channel, data)) = ws_payload(m, base64) else { continue };
                // Only data channels carry bytes to the pod.
                let i = usize::from(channel / 2);
                if channel % 2 == 0
                    && !data.is_empty()
                    && let Some(Some(tx)) = to_pod.get(i)
                    && tx.send(data).await.is_err()
                {
                    to_pod[i] = None;
                }
            }
            Some(done) = tasks.join_next() => {
                if let Ok((i, result)) = done {
                    if let Err(msg) = result {
                        let text = format!(
                            "error forwarding port {} to pod {}, uid {}: {msg}",
                            ports[i], target.key.name, target.key.uid
                        );
                        let _ = out.send(((2 * i + 1) as u8, Bytes::from(text))).await;
                    }
                    to_pod[i] = None;
                }
                left -= 1;
                if left == 0 {
                    break "every port's connection ended".into();
                }
            }
            _ = tick.tick() => {
                if !running(&target.key) {
                    let msg = format!("pod {}/{} stopped", target.key.namespace, target.key.name);
                    for (i, p) in ports.iter().enumerate() {
                        let text = format!(
                            "error forwarding port {p} to pod {}, uid {}: {msg}",
                            target.key.name, target.key.uid
                        );
                        let _ = out.send(((2 * i + 1) as u8, Bytes::from(text))).await;
                    }
                    break msg;
                }
                if activity.idle() >= IDLE_TIMEOUT {
                    break format!("idle for {IDLE_TIMEOUT:?}");
                }
                if writer.is_finished() {
                    break "writing to the client failed".into();
                }
            }
        }
    };
    tracing::debug!(pod = %target.key, "port-forward session ends: {why}");
    tasks.abort_all();
    drop(out);
    let _ = tokio::time::timeout(WRITE_STALL, writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::DuplexStream;

    /// The client side of a session, speaking as client-go does.
    struct Client {
        io: DuplexStream,
        enc: Encoder,
        dec: Decoder,
        buf: BytesMut,
    }

    impl Client {
        async fn send(&mut self, f: Frame) {
            let mut out = BytesMut::new();
            self.enc.encode(&f, &mut out).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        async fn open(&mut self, id: u32, kind: &str, port: u16, rid: &str) {
            self.send(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: vec![
                    ("streamtype".into(), kind.into()),
                    ("port".into(), port.to_string()),
                    ("requestid".into(), rid.into()),
                ],
            })
            .await;
        }

        /// The next frame, or None once the server closed the connection.
        async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                let read =
                    tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf));
                match read.await.expect("a frame within 10 s") {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        }

        /// Frames until `stop` matches one (included).
        async fn until(&mut self, stop: impl Fn(&Frame) -> bool) -> Vec<Frame> {
            let mut got = Vec::new();
            while let Some(f) = self.next().await {
                let done = stop(&f);
                got.push(f);
                if done {
                    return got;
                }
            }
            panic!("connection closed before the expected frame: {got:?}");
        }
    }

    fn data_of(frames: &[Frame], id: u32) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Data {
                    stream_id, data, ..
                } if *stream_id == id => Some(data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn is_fin(f: &Frame, id: u32) -> bool {
        matches!(f, Frame::Data { stream_id, flags, .. } if *stream_id == id && flags & FLAG_FIN != 0)
    }

    /// A "pod" that answers each connection with `echo:` and what it read, then closes.
    async fn echo_pod() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = c.read_to_end(&mut got).await;
                    let _ = c.write_all(b"echo:").await;
                    let _ = c.write_all(&got).await;
                });
            }
        });
        addr
    }

    fn session(
        addr: SocketAddr,
        running: Arc<AtomicBool>,
    ) -> (Client, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let target = Target {
            key: PodKey {
                namespace: "default".into(),
                name: "p".into(),
                uid: "u1".into(),
            },
            addrs: vec![addr],
        };
        let task = tokio::spawn(serve(server, target, move |_| {
            running.load(Ordering::Relaxed)
        }));
        (
            Client {
                io: client,
                enc: Encoder::default(),
                dec: Decoder::default(),
                buf: BytesMut::new(),
            },
            task,
        )
    }

    #[tokio::test]
    async fn forwards_pairs_and_says_why_a_port_is_refused() {
        let addr = echo_pod().await;
        let (mut c, task) = session(addr, Arc::new(AtomicBool::new(true)));
        // As client-go: the error stream, its side closed at once, then the data stream.
        for (rid, err, data) in [("0", 1, 3), ("1", 5, 7)] {
            c.open(err, "error", addr.port(), rid).await;
            c.send(Frame::Data {
                stream_id: err,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await;
            c.open(data, "data", addr.port(), rid).await;
            c.send(Frame::Data {
                stream_id: data,
                flags: 0,
                data: Bytes::from_static(b"GET /"),
            })
            .await;
            c.send(Frame::Data {
                stream_id: data,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await;
            let frames = c.until(|f| is_fin(f, data)).await;
            assert!(frames.contains(&Frame::SynReply {
                stream_id: err,
                flags: 0,
                headers: vec![]
            }));
            assert!(frames.contains(&Frame::SynReply {
                stream_id: data,
                flags: 0,
                headers: vec![]
            }));
            assert_eq!(data_of(&frames, data), b"echo:GET /");
            // kubectl resets the data stream when the pod's side ended, then reads the error
            // stream to its end: nothing said.
            c.send(Frame::RstStream {
                stream_id: data,
                status: spdy::rst::CANCEL,
            })
            .await;
            let frames = c.until(|f| is_fin(f, err)).await;
            assert!(data_of(&frames, err).is_empty(), "{frames:?}");
        }
        // A port the pod does not serve.
        c.open(9, "error", 1, "2").await;
        c.open(11, "data", 1, "2").await;
        let frames = c.until(|f| is_fin(f, 9)).await;
        let said = String::from_utf8(data_of(&frames, 9)).unwrap();
        assert!(
            said.contains("pod default/p does not serve port 1")
                && said.contains(&addr.port().to_string()),
            "{said}"
        );
        c.until(|f| matches!(f, Frame::RstStream { stream_id: 11, .. }))
            .await;
        // A stream without a port, and one that reuses an id: reset.
        c.send(Frame::SynStream {
            stream_id: 13,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: vec![("streamtype".into(), "data".into())],
        })
        .await;
        c.until(|f| matches!(f, Frame::RstStream { stream_id: 13, .. }))
            .await;
        c.open(13, "error", addr.port(), "3").await;
        c.until(|f| {
            matches!(
                f,
                Frame::RstStream {
                    stream_id: 13,
                    status: spdy::rst::PROTOCOL_ERROR
                }
            )
        })
        .await;
        // Pings are answered.
        c.send(Frame::Ping { id: 7 }).await;
        c.until(|f| *f == Frame::Ping { id: 7 }).await;
        // The client goes away: the session ends.
        drop(c);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_stopped_pod_ends_the_session_and_its_connections() {
        // A pod that keeps its connections open.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (closed_tx, mut closed_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut b = [0u8; 16];
            // Returns 0 once the node closed its side.
            while c.read(&mut b).await.unwrap_or(0) > 0 {}
            let _ = closed_tx.send(()).await;
        });
        let running = Arc::new(AtomicBool::new(true));
        let (mut c, task) = session(addr, running.clone());
        c.open(1, "error", addr.port(), "0").await;
        c.open(3, "data", addr.port(), "0").await;
        c.send(Frame::Data {
            stream_id: 3,
            flags: 0,
            data: Bytes::from_static(b"x"),
        })
        .await;
        c.until(|f| matches!(f, Frame::SynReply { stream_id: 3, .. }))
            .await;
        running.store(false, Ordering::Relaxed);
        let frames = c.until(|f| matches!(f, Frame::GoAway { .. })).await;
        let said = String::from_utf8(data_of(&frames, 1)).unwrap();
        assert!(said.contains("pod default/p stopped"), "{said}");
        assert_eq!(c.next().await, None, "connection closed after GOAWAY");
        tokio::time::timeout(Duration::from_secs(10), closed_rx.recv())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn streams_beyond_the_cap_are_refused() {
        let addr = echo_pod().await;
        let (mut c, _task) = session(addr, Arc::new(AtomicBool::new(true)));
        for i in 0..MAX_STREAMS as u32 {
            c.open(2 * i + 1, "error", addr.port(), &i.to_string())
                .await;
        }
        let over = 2 * MAX_STREAMS as u32 + 1;
        c.open(over, "error", addr.port(), "over").await;
        c.until(|f| matches!(f, Frame::RstStream { stream_id, status: spdy::rst::REFUSED_STREAM } if *stream_id == over)).await;
    }

    #[test]
    fn websocket_ports_and_channels_as_the_kubelet_reads_them() {
        assert_eq!(ws_ports("port=80&port=81%2C82"), Ok(vec![80, 81, 82]));
        assert_eq!(ws_ports("port=80,81"), Ok(vec![80, 81]));
        assert!(ws_ports("").is_err());
        assert!(ws_ports("port=0").is_err());
        assert!(ws_ports("port=x").is_err());
        let many = vec!["port=1"; MAX_WS_PORTS + 1].join("&");
        assert!(ws_ports(&many).is_err());
        for base64 in [false, true] {
            let m = ws_message(3, b"\x00\x01hi", base64);
            assert_eq!(
                ws_payload(m, base64),
                Some((3, Bytes::from_static(b"\x00\x01hi")))
            );
        }
        assert_eq!(ws_message(1, b"hi", true), Message::text("1aGk="));
        assert_eq!(
            ws_message(1, b"hi", false),
            Message::binary(b"\x01hi".to_vec())
        );
    }

    #[tokio::test]
    async fn websocket_sessions_forward_each_port_and_say_why_one_is_refused() {
        use futures::{SinkExt, StreamExt};
        // A pod that answers the first bytes it reads, then closes.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut b = [0u8; 64];
                let n = c.read(&mut b).await.unwrap_or(0);
                let _ = c.write_all(b"echo:").await;
                let _ = c.write_all(&b[..n]).await;
            }
        });
        let (client, server) = tokio::io::duplex(1 << 16);
        let target = Target {
            key: PodKey {
                namespace: "default".into(),
                name: "p".into(),
                uid: "u1".into(),
            },
            addrs: vec![addr],
        };
        let server = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        let task = tokio::spawn(serve_websocket(
            server,
            target,
            vec![addr.port(), 1],
            false,
            |_| true,
        ));
        let mut c = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let mut next = async || {
            let m = tokio::time::timeout(Duration::from_secs(10), c.next()).await;
            match m.expect("a message within 10 s") {
                Some(Ok(Message::Binary(b))) => Some((b[0], b.slice(1..))),
                Some(Ok(Message::Close(_))) | None => None,
                other => panic!("{other:?}"),
            }
        };
        // The ports first, on every channel.
        let le = |p: u16| Bytes::copy_from_slice(&p.to_le_bytes());
        assert_eq!(next().await, Some((0, le(addr.port()))));
        assert_eq!(next().await, Some((1, le(addr.port()))));
        assert_eq!(next().await, Some((2, le(1))));
        assert_eq!(next().await, Some((3, le(1))));
        let (ch, said) = next().await.unwrap();
        assert_eq!(ch, 3);
        let said = String::from_utf8(said.to_vec()).unwrap();
        assert!(
            said.contains("pod default/p does not serve port 1"),
            "{said}"
        );
        c.send(ws_message(0, b"GET /", false)).await.unwrap();
        let mut got = Vec::new();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), c.next())
                .await
                .unwrap();
            match m {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(b[0], 0);
                    got.extend_from_slice(&b[1..]);
                }
                _ => break,
            }
        }
        assert_eq!(got, b"echo:GET /");
        // Every port's connection ended: so does the session.
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn served_ports_come_from_the_plan() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u", "annotations": {
                "alpha.wagi.krustlet.dev/default-host": "0.0.0.0:3001",
                "alpha.wagi.krustlet.dev/modules": "{\"hello\": {\"route\": \"/hello\"}}",
            }},
            "spec": {
                "containers": [{"name": "hello", "image": "r/x:v1",
                    "env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}],
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": []}}],
            },
        }))
        .unwrap();
        let ctx = workload::PlanContext::default();
        assert_eq!(served(&pod, &ctx), vec!["127.0.0.1:3001".parse().unwrap()]);
        let comp: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c", "namespace": "default", "uid": "u"},
            "spec": {"containers": [{"name": "web", "image": "r/c:v1",
                "ports": [{"containerPort": 8081}, {"containerPort": 53, "protocol": "UDP"}]}]},
        }))
        .unwrap();
        let ctx = workload::PlanContext {
            node_ip: Some("127.0.0.2".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(served(&comp, &ctx), vec!["127.0.0.2:8081".parse().unwrap()]);
    }
}
