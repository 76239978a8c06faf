//! The WAGI listener of one pod: HTTP request -> route -> CGI environment -> one instance of the
//! module -> CGI response. Per request: a route lookup, the environment, one instantiate-and-run
//! and one parse; everything else (compile, link, route table, allow-lists) was done at start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use runtime::{AllowList, Invocation, Preopen, Program, RunError, Runtime, Stream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wagi::routes::RouteTable;

use crate::logs::ContainerLog;

/// Largest request body passed to a module.
const MAX_BODY: usize = 16 << 20;

/// One route's module and what it runs with.
pub struct Handler {
    pub container: String,
    pub program: Arc<Program>,
    pub entrypoint: String,
    pub argv: Option<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Preopen>,
    pub allowed_hosts: Arc<AllowList>,
    pub log: ContainerLog,
}

pub struct WagiApp {
    pub pod: String,
    pub routes: RouteTable<Arc<Handler>>,
    pub runtime: Runtime,
    pub timeout: Duration,
    pub server_software: String,
}

type Body = Full<Bytes>;

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl WagiApp {
    async fn handle(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        local: SocketAddr,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let Some(m) = self.routes.lookup(path) else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
        };
        let h = m.value;
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
        let cgi_env =
            wagi::cgi::environment(&meta, m.pattern, m.raw_path_info, &self.server_software);
        let mut env = Vec::with_capacity(h.env.len() + cgi_env.len());
        env.extend(h.env.iter().cloned());
        env.extend(cgi_env);
        let script = m.pattern.script_name();
        let args = match &h.argv {
            None => wagi::cgi::argv(script, parts.uri.query()),
            Some(t) => {
                let qargs = wagi::cgi::argv(script, parts.uri.query());
                let rest = qargs.get(1..).unwrap_or_default().join(" ");
                t.replace("${SCRIPT_NAME}", script)
                    .replace("${ARGS}", &rest)
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            }
        };
        let inv = Invocation {
            entrypoint: h.entrypoint.clone(),
            args,
            env,
            stdin: body,
            stdout: Stream::Capture { limit: 32 << 20 },
            stderr: Stream::Capture { limit: 1 << 20 },
            preopens: h.mounts.clone(),
            allowed_hosts: h.allowed_hosts.clone(),
            timeout: Some(self.timeout),
        };
        match self.runtime.run(&h.program, inv).await {
            Ok(out) => {
                h.log.lines(&out.stderr);
                match wagi::response::parse(&out.stdout) {
                    Ok(cgi) => {
                        let mut resp =
                            Response::new(Full::new(out.stdout.slice(cgi.body_offset..)));
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
                        tracing::warn!(pod = %self.pod, route = %m.pattern, "{why}");
                        text(
                            StatusCode::BAD_GATEWAY,
                            "bad gateway: the module's response was not a valid CGI response",
                        )
                    }
                }
            }
            Err(e) => {
                let (status, stderr) = match &e {
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
                h.log
                    .note(&format!("wasinode: {} {path}: {e}", parts.method));
                tracing::warn!(pod = %self.pod, route = %m.pattern, error = %e, "request failed");
                let msg = match status {
                    StatusCode::GATEWAY_TIMEOUT => {
                        "gateway timeout: the module did not answer in time"
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        "service unavailable: too many requests in flight"
                    }
                    _ => "internal server error: the module failed",
                };
                text(status, msg)
            }
        }
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting and gives in-flight
/// requests up to `grace` to finish. Returns when every connection is closed (or grace ran out).
pub async fn serve(
    listener: TcpListener,
    app: Arc<WagiApp>,
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
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.handle(req, remote, local).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(pod = %app.pod, ?grace, "in-flight requests did not finish within the grace period; cutting them");
    }
    // Nothing of a stopped pod keeps running: connections still open now are closed.
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
