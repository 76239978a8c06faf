//! The HTTP listener of one pod: HTTP request -> route -> executor -> one instance -> response.
//! Two executors share the listener and the router: WAGI (CGI environment, the module run with
//! the request body on stdin, its stdout parsed as a CGI response) and `wasi:http` (the request
//! handed to an HTTP handler component, bodies streamed both ways). Per request: a route lookup,
//! the executor's own work, one instance; everything else (compile, link, route table,
//! allow-lists) was done at start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use runtime::{
    AllowList, ComponentBody, Invocation, Preopen, Program, ProgramKind, RunError, Runtime, Stream,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wagi::routes::RouteTable;

use crate::listen::Conns;
use crate::logs::ContainerLog;

/// Largest request body passed to a module.
const MAX_BODY: usize = 16 << 20;

/// One route's module and what it runs with.
pub struct Handler {
    pub container: String,
    pub program: Arc<Program>,
    pub entrypoint: String,
    pub argv: Option<String>,
    /// The container's environment, laid out once.
    pub env: runtime::Environ,
    pub mounts: Vec<Preopen>,
    pub allowed_hosts: Arc<AllowList>,
    pub log: ContainerLog,
    /// `log` as the line sink components write stdout/stderr to, made once.
    sink: Arc<dyn runtime::LineSink>,
    /// The reused instances of a WASI 0.3 service (`None` for other kinds).
    pub service: Option<runtime::Service>,
    /// The container's `limits.memory` and `limits.cpu`.
    pub resources: runtime::Limits,
    /// The container's usage (CPU and memory of its instances).
    pub meter: Option<Arc<runtime::Meter>>,
    /// Where a request over the memory limit is told as a Warning Event, at most one per
    /// [`LIMIT_EVENT_EVERY`] per container (each one is in the container log).
    pub limit_events: Option<LimitEvents>,
    /// What the route this handler serves counts (set by the supervisor).
    pub metrics: Option<Arc<crate::metrics::RouteMetrics>>,
}

/// How often a container's requests over its memory limit are told in an Event.
pub const LIMIT_EVENT_EVERY: Duration = Duration::from_secs(10);

/// Warning Events for a container's requests that hit its memory limit, rate-limited.
pub struct LimitEvents {
    pub reporter: crate::report::Reporter,
    pub pod: crate::plan::PodKey,
    began: std::time::Instant,
    /// Milliseconds after `began` of the last Event, plus one (0: none yet).
    last: std::sync::atomic::AtomicU64,
}

impl LimitEvents {
    pub fn new(reporter: crate::report::Reporter, pod: crate::plan::PodKey) -> LimitEvents {
        LimitEvents {
            reporter,
            pod,
            began: std::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn memory_limit(&self, container: &str, what: &str) {
        use std::sync::atomic::Ordering;
        let now = self.began.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let every = LIMIT_EVENT_EVERY.as_millis() as u64;
        if last != 0 && now < last + every {
            return;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.reporter.event(
            &self.pod,
            crate::report::EventType::Warning,
            "MemoryLimitExceeded",
            format!("container {container}: {what} (the request failed alone; see kubectl logs)"),
        );
    }
}

impl Handler {
    /// What the executors need, for `program` serving as `container`; a 0.3 service gets its
    /// instance pool here (retired when the handler is dropped with its pod's listener).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: &Runtime,
        limits: runtime::ServiceLimits,
        container: &str,
        program: Arc<Program>,
        entrypoint: String,
        argv: Option<String>,
        env: Vec<(String, String)>,
        mounts: Vec<Preopen>,
        allowed_hosts: Arc<AllowList>,
        log: ContainerLog,
        resources: runtime::Limits,
        meter: Option<Arc<runtime::Meter>>,
    ) -> Result<Handler, RunError> {
        let sink: Arc<dyn runtime::LineSink> = Arc::new(log.clone());
        let env = runtime::Environ::new(&env);
        let service = match program.kind() {
            ProgramKind::HttpService => {
                let inv = Invocation {
                    env: env.clone(),
                    stdout: Stream::Lines(sink.clone()),
                    stderr: Stream::Lines(sink.clone()),
                    preopens: mounts.clone(),
                    allowed_hosts: allowed_hosts.clone(),
                    limits: resources.clone(),
                    meter: meter.clone(),
                    ..Invocation::new("")
                };
                Some(runtime.service(&program, inv, limits, Some(sink.clone()))?)
            }
            _ => None,
        };
        Ok(Handler {
            container: container.to_string(),
            program,
            entrypoint,
            argv,
            env,
            mounts,
            allowed_hosts,
            log,
            sink,
            service,
            resources,
            meter,
            limit_events: None,
            metrics: None,
        })
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(s) = &self.service {
            s.stop();
        }
    }
}

pub struct WagiApp {
    pub pod: String,
    pub routes: RouteTable<Arc<Handler>>,
    pub runtime: Runtime,
    pub timeout: Duration,
    pub server_software: String,
    /// Instances this pod may have in flight at once, so that a pod whose requests hang holds
    /// only its share of the runtime's slots; past it a request is answered 503 at once.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The pod's in-flight requests gauge.
    pub in_flight: Option<crate::metrics::InFlight>,
    /// What requests no route matched count under.
    pub unrouted: Option<crate::metrics::RouteMetrics>,
    /// Where accepted connections are served; `None` serves them on the listener's runtime.
    pub threads: Option<crate::threads::ServeThreads>,
}

/// A WAGI response (whole, parsed from stdout) or a component's (streamed while the instance
/// runs, holding the pod's slot until it ends).
type Body = Either<Full<Bytes>, Held<ComponentBody>>;

fn full(b: Bytes) -> Body {
    Either::Left(Full::new(b))
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl WagiApp {
    /// Serves one request, counted under the route that matched it.
    async fn handle(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        local: SocketAddr,
    ) -> Response<Body> {
        let began = std::time::Instant::now();
        let _in_flight = self.in_flight.as_ref().map(|g| g.enter());
        // `None` while no route matched; a route's own counters once one did.
        let mut route = None;
        let resp = self.dispatch(req, remote, local, &mut route).await;
        let counted = match &route {
            None => self.unrouted.as_ref(),
            Some(r) => r.as_deref(),
        };
        if let Some(r) = counted {
            r.answered(resp.status(), began.elapsed());
        }
        resp
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        local: SocketAddr,
        route: &mut Option<Option<Arc<crate::metrics::RouteMetrics>>>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let Some(m) = self.routes.lookup(path) else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        let h = m.value;
        *route = Some(h.metrics.clone());
        if h.program.kind().serves_http() {
            let (h, pattern) = (h.clone(), m.pattern.clone());
            let req = Request::from_parts(parts, body);
            return self.handle_component(&h, &pattern, req, local).await;
        }
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
        };
        // Held until the instance is gone (the end of this function).
        let Ok(_slot) = self.slots.try_acquire() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "service unavailable: too many requests in flight for this pod",
            );
        };
        let meta = wagi::cgi::RequestMeta {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
            body_len: body.len(),
            remote_addr: remote,
            local_addr: local,
            scheme: "http",
        };
        let env = request_environ(
            &h.env,
            &meta,
            m.pattern,
            m.raw_path_info,
            &self.server_software,
        );
        // As WAGI 0.8.1: the request's path and its raw query, not the CGI variables.
        let args = match &h.argv {
            None => wagi::cgi::argv(path, parts.uri.query()),
            Some(t) => wagi::cgi::argv_from_template(t, path, parts.uri.query()),
        };
        let inv = Invocation {
            entrypoint: h.entrypoint.clone(),
            args,
            env,
            stdin: body,
            stdout: Stream::Capture {
                limit: runtime::STDOUT_CAPTURE_LIMIT,
            },
            stderr: Stream::Capture {
                limit: runtime::STDERR_CAPTURE_LIMIT,
            },
            preopens: h.mounts.clone(),
            allowed_hosts: h.allowed_hosts.clone(),
            timeout: Some(self.timeout),
            limits: h.resources.clone(),
            meter: h.meter.clone(),
        };
        match self.runtime.run(&h.program, inv).await {
            Ok(out) => {
                h.log.lines(&out.stderr);
                match wagi::response::parse(&out.stdout) {
                    Ok(cgi) => {
                        let mut resp = Response::new(full(out.stdout.slice(cgi.body_offset..)));
                        *resp.status_mut() = cgi.status;
                        let headers = resp.headers_mut();
                        for (k, v) in cgi.headers {
                            // Framing is ours to decide, not the module's.
                            if k == header::CONTENT_LENGTH
                                || k == header::TRANSFER_ENCODING
                                || k == header::CONNECTION
                            {
                                continue;
                            }
                            headers.append(k, v);
                        }
                        resp
                    }
                    Err(e) => {
                        let why = format!(
                            "bad CGI response from {} (exit code {}): {e}",
                            h.container, out.exit_code
                        );
                        h.log
                            .note(&format!("wasinode: {} {path}: {why}", parts.method));
                        // The container log has it; clients must not flood the agent's own log.
                        tracing::debug!(pod = %self.pod, route = %m.pattern, "{why}");
                        text(
                            StatusCode::BAD_GATEWAY,
                            "bad gateway: the module's response was not a valid CGI response",
                        )
                    }
                }
            }
            Err(e) => self.failed(h, &parts.method, path, m.pattern, &e),
        }
    }

    /// An HTTP handler component serves the request: the request's body streams into the guest
    /// and the response's out of it, while the instance lives (and holds one of the pod's slots).
    async fn handle_component(
        &self,
        h: &Handler,
        pattern: &wagi::routes::RoutePattern,
        mut req: Request<Incoming>,
        local: SocketAddr,
    ) -> Response<Body> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "service unavailable: too many requests in flight for this pod",
            );
        };
        // An HTTP/1.0 request may come without Host; a wasi:http request has an authority.
        if !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&local.to_string())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        // A 0.2 instance is the request's own: the runtime keeps the slot as long as the
        // instance lives. A 0.3 instance is shared: the slot stands for this request until its
        // body is done.
        let (served, slot) = match &h.service {
            // From the instances of the serving thread this request runs on.
            Some(service) => (
                service.handle(crate::threads::lane(), req).await,
                Some(slot),
            ),
            None => {
                let inv = Invocation {
                    entrypoint: String::new(),
                    args: Vec::new(),
                    env: h.env.clone(),
                    stdin: Bytes::new(),
                    stdout: Stream::Lines(h.sink.clone()),
                    stderr: Stream::Lines(h.sink.clone()),
                    preopens: h.mounts.clone(),
                    allowed_hosts: h.allowed_hosts.clone(),
                    timeout: Some(self.timeout),
                    limits: h.resources.clone(),
                    meter: h.meter.clone(),
                };
                let served = self.runtime.serve_http(&h.program, req, inv, slot).await;
                (served, None)
            }
        };
        match served {
            Ok(resp) => resp.map(|body| Either::Right(Held { body, _slot: slot })),
            Err(e) => self.failed(h, &method, &path, pattern, &e),
        }
    }

    /// The response for an invocation that failed, with the reason in the container log.
    fn failed(
        &self,
        h: &Handler,
        method: &http::Method,
        path: &str,
        pattern: &wagi::routes::RoutePattern,
        e: &RunError,
    ) -> Response<Body> {
        let (status, stderr) = match e {
            RunError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
            RunError::Busy => (StatusCode::SERVICE_UNAVAILABLE, None),
            RunError::MemoryLimit { stderr, .. } | RunError::Trap { stderr, .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, Some(stderr))
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        if let Some(s) = stderr {
            h.log.lines(s);
        }
        if let Some(m) = h.metrics.as_ref().and_then(|m| m.container.as_ref()) {
            m.failed(e);
        }
        h.log.note(&format!("wasinode: {method} {path}: {e}"));
        if let (RunError::MemoryLimit { .. }, Some(ev)) = (e, &h.limit_events) {
            ev.memory_limit(&h.container, &format!("{method} {path}: {e}"));
        }
        tracing::debug!(pod = %self.pod, route = %pattern, error = %e, "request failed");
        let msg = match status {
            StatusCode::GATEWAY_TIMEOUT => "gateway timeout: the module did not answer in time",
            StatusCode::SERVICE_UNAVAILABLE => "service unavailable: too many requests in flight",
            _ => "internal server error: the module failed",
        };
        text(status, msg)
    }
}

/// A WAGI request's environment: the container's variables, then the request's CGI variables
/// written straight into the same buffer.
pub fn request_environ(
    base: &runtime::Environ,
    meta: &wagi::cgi::RequestMeta<'_>,
    pattern: &wagi::routes::RoutePattern,
    raw_path_info: &str,
    server_software: &str,
) -> runtime::Environ {
    // 19 CGI variables and one per header; most requests fit in the bytes reserved.
    let mut env = base.clone_with_room(19 + meta.headers.keys_len(), 1024);
    wagi::cgi::write_environment(
        meta,
        pattern,
        raw_path_info,
        server_software,
        &mut |k, v| env.push(k, v),
    );
    env
}

/// A response body that keeps something (the pod's instance slot) until the body is done.
pub struct Held<B> {
    body: B,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting and gives in-flight
/// requests up to `grace` to finish. Returns when every connection is closed (or grace ran out).
/// `conns` bounds the connections held and cuts slow and idle ones ([`crate::listen`]); a
/// request (body included) that takes longer than the module's deadline plus the header
/// timeout is answered 408.
pub async fn serve(
    listener: TcpListener,
    app: Arc<WagiApp>,
    conns: Conns,
    stop: CancellationToken,
    grace: Duration,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no address");
            return;
        }
    };
    let limits = *conns.limits();
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let request_limit = app.timeout + limits.header_timeout;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // At the cap the oldest idle connection makes room; if all are busy, this one is closed.
        let Some(conn) = conns.admit() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(conn);
        let in_app = app.clone();
        let in_conn = conn.clone();
        let svc = hyper::service::service_fn(move |req| {
            let app = in_app.clone();
            let busy = in_conn.request();
            async move {
                let resp = match tokio::time::timeout(request_limit, app.handle(req, remote, local))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => text(StatusCode::REQUEST_TIMEOUT, "request timeout"),
                };
                drop(busy);
                Ok::<_, Infallible>(resp)
            }
        });
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        // Serves the connection on the runtime that polls this future (its socket is
        // registered there).
        let connection = async move |stream: TcpStream| {
            let served = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            tokio::select! {
                _ = watcher.watch(served) => {}
                // Evicted for a newer connection, or idle: no request is in flight, so closing
                // the socket loses nothing.
                _ = conn.closed() => {}
            }
        };
        match &app.threads {
            None => {
                tasks.spawn(connection(stream));
            }
            // Moved to a serving thread's own reactor, where all its requests then run.
            Some(threads) => match stream.into_std() {
                Ok(stream) => threads.spawn_in(&mut tasks, async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => connection(stream).await,
                        Err(e) => tracing::debug!(error = %e, "cannot register a connection"),
                    }
                }),
                Err(e) => tracing::debug!(error = %e, "cannot hand a connection over"),
            },
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(pod = %app.pod, ?grace, "in-flight requests did not finish within the grace period; cutting them");
    }
    // Nothing of a stopped pod keeps running: connections still open now are closed.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}
