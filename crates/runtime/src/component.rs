//! Components: what a component is for (read from its exports), its host state, and running it
//! as a `wasi:http` 0.2 handler (a fresh instance per request) or a `wasi:cli/run` command.
//!
//! Everything a request needs that does not depend on the request was done once at load: the
//! component compiled, linked into a `ProxyPre` / `CommandPre`. Per request: a store, a WASI
//! context from the invocation, an instance from the pool, one call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::time::Instant;
use wasmtime::Store;
use wasmtime::component::{Component, ResourceTable};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::engine::{Compiled, Program, Runtime};
use crate::limits::InstanceLimiter;
use crate::outbound::AllowList;
use crate::output::Stream;
use crate::run::{Invocation, Outcome, RunError, pipe_for, pool_full, preopen_all};

/// The export of an HTTP handler component (WASI 0.2): `wasi:http/incoming-handler@0.2.x`.
const HTTP_HANDLER_02: &str = "wasi:http/incoming-handler@0.2.";
/// The export of an HTTP service (WASI 0.3, world `wasi:http/service`): `wasi:http/handler@0.3.x`.
const HTTP_HANDLER_03: &str = "wasi:http/handler@0.3.";
/// The export of a command component (WASI 0.2): `wasi:cli/run@0.2.x`.
const CLI_RUN_02: &str = "wasi:cli/run@0.2.";

/// The body of a component's response: streamed from the guest as it writes it.
pub type ComponentBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// What a program is for, as its bytes and exports say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// A core module: a WAGI handler or a WASI preview-1 command (`_start`).
    Module,
    /// A component exporting `wasi:http/incoming-handler@0.2.x`.
    HttpHandler,
    /// A component exporting `wasi:http/handler@0.3.x`: instances reused, concurrent requests.
    HttpService,
    /// A component exporting `wasi:cli/run@0.2.x`.
    Command,
}

impl ProgramKind {
    pub fn is_component(self) -> bool {
        !matches!(self, ProgramKind::Module)
    }

    /// Whether it answers HTTP requests itself (a wasi:http handler or service).
    pub fn serves_http(self) -> bool {
        matches!(self, ProgramKind::HttpHandler | ProgramKind::HttpService)
    }
}

impl std::fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProgramKind::Module => "core module",
            ProgramKind::HttpHandler => "wasi:http handler component",
            ProgramKind::HttpService => "wasi:http 0.3 service component",
            ProgramKind::Command => "wasi:cli command component",
        })
    }
}

/// Whether `bytes` (binary) is a component rather than a core module: the preamble's version
/// and layer fields (`\0asm`, then 0x0d 0x00 0x01 0x00 for components, 0x01 0x00 0x00 0x00 for
/// core modules).
pub(crate) fn is_component_binary(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [0x01, 0x00]
}

/// The names a component exports, for telling its kind and for saying why it was refused.
pub(crate) fn export_names(engine: &wasmtime::Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// The kind a component's exports make it; `None` when it exports nothing wasinode can serve
/// or run. An HTTP handler that also exports `run` is served (as `wasmtime serve` would).
pub(crate) fn kind_of(exports: &[String]) -> Option<ProgramKind> {
    if exports.iter().any(|e| e.starts_with(HTTP_HANDLER_03)) {
        Some(ProgramKind::HttpService)
    } else if exports.iter().any(|e| e.starts_with(HTTP_HANDLER_02)) {
        Some(ProgramKind::HttpHandler)
    } else if exports.iter().any(|e| e.starts_with(CLI_RUN_02)) {
        Some(ProgramKind::Command)
    } else {
        None
    }
}

/// The state of one component store.
pub struct ComponentHost {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: Outbound,
    pub(crate) limiter: InstanceLimiter,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ComponentHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outbound `wasi:http` requests of one instance: only to the container's allow-list (scheme,
/// host and port, as for WAGI modules), through the runtime's guarded client (no link-local or
/// metadata addresses, no proxy, no redirects followed), within the invocation's deadline and
/// the runtime's outbound bound.
struct Outbound {
    allow: Arc<AllowList>,
    client: reqwest::Client,
    deadline: Option<Instant>,
    bound: Duration,
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: IoFuture,
    ) -> Box<
        dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>>
            + Send,
    > {
        let allow = self.allow.clone();
        let client = self.client.clone();
        let now = Instant::now();
        let limit = match self.deadline {
            Some(d) => d.saturating_duration_since(now).min(self.bound),
            None => self.bound,
        };
        Box::new(async move {
            use wasmtime_wasi_http::Error as E;
            let url = url::Url::parse(&request.uri().to_string())
                .map_err(|_| E::HttpRequestUriInvalid)?;
            if !allow.allows(&url) {
                tracing::debug!(%url, "outbound wasi:http request denied by the allow-list");
                return Err(E::HttpRequestDenied);
            }
            let (parts, body) = request.into_parts();
            let mut headers = parts.headers;
            crate::outbound::strip_hop_by_hop(&mut headers);
            let body = reqwest::Body::wrap_stream(body.into_data_stream());
            let resp = client
                .request(parts.method, url)
                .headers(headers)
                .body(body)
                .timeout(limit)
                .send()
                .await
                .map_err(|e| {
                    if crate::outbound::is_restricted_name(&e) {
                        E::DestinationIpProhibited
                    } else if e.is_timeout() {
                        E::ConnectionTimeout
                    } else if e.is_connect() {
                        E::ConnectionRefused
                    } else {
                        E::HttpProtocolError
                    }
                })?;
            let mut out = http::Response::builder().status(resp.status());
            if let Some(h) = out.headers_mut() {
                *h = resp.headers().clone();
                crate::outbound::strip_hop_by_hop(h);
            }
            let stream = futures::TryStreamExt::map_err(resp.bytes_stream(), |e| {
                if e.is_timeout() {
                    wasmtime_wasi_http::Error::ConnectionReadTimeout
                } else {
                    wasmtime_wasi_http::Error::ConnectionTerminated
                }
            });
            let body = http_body_util::StreamBody::new(futures::TryStreamExt::map_ok(
                stream,
                http_body::Frame::data,
            ));
            let out = out
                .body(body.boxed_unsync())
                .map_err(|_| E::HttpProtocolError)?;
            let io: IoFuture = Box::new(async { Ok(()) });
            Ok((out, io))
        })
    }
}

impl Runtime {
    /// A store of `engine` (the one the program was compiled by) for one instance.
    pub(crate) fn component_store(
        &self,
        engine: &wasmtime::Engine,
        inv: &Invocation,
    ) -> Result<(Store<ComponentHost>, Pipes), RunError> {
        let deadline = inv.timeout.map(|t| Instant::now() + t);
        let mut b = WasiCtxBuilder::new();
        b.args(&inv.args);
        for (k, v) in inv.env.iter() {
            b.env(k, v);
        }
        b.stdin(MemoryInputPipe::new(inv.stdin.clone()));
        let (stdout_pipe, stdout) = pipe_for(&inv.stdout);
        let (stderr_pipe, stderr) = pipe_for(&inv.stderr);
        b.stdout(stdout).stderr(stderr);
        preopen_all(&mut b, &inv.preopens)?;
        // wasi:sockets: TCP connections only where the allow-list has a `tcp://` entry (an
        // implicit bind to the wildcard address comes with each connect); no listening, no
        // UDP, no name lookups. Without such entries the builder's default refuses everything
        // (TCP and UDP off, every address refused).
        b.allow_ip_name_lookup(false).allow_udp(false);
        if inv.allowed_hosts.has_sockets() {
            let allow = inv.allowed_hosts.clone();
            // wasmtime-wasi turns TCP off unless asked; the address check below is the policy.
            b.allow_tcp(true);
            b.socket_addr_check(move |addr, used| {
                let ok = match used {
                    SocketAddrUse::TcpConnect => allow.allows_socket(addr),
                    SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                    _ => false,
                };
                Box::pin(async move { ok })
            });
        }
        let host = ComponentHost {
            wasi: b.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: Outbound {
                allow: inv.allowed_hosts.clone(),
                client: self.inner.http.clone(),
                deadline,
                bound: self.inner.config.outbound_timeout,
            },
            limiter: InstanceLimiter::new(self.memory_limit(&inv.limits))
                .metered(inv.meter.clone()),
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limiter);
        store.set_epoch_deadline(1);
        let cpu = inv.limits.cpu.clone();
        let meter = inv.meter.clone();
        store.epoch_deadline_callback(move |_| {
            Ok(crate::quota::on_tick(cpu.as_ref(), meter.as_ref()))
        });
        Ok((
            store,
            Pipes {
                stdout: stdout_pipe,
                stderr: stderr_pipe,
            },
        ))
    }

    /// Runs a command component's `wasi:cli/run` to its end.
    pub(crate) async fn run_command(
        &self,
        pre: &CommandPre<ComponentHost>,
        inv: Invocation,
    ) -> Result<Outcome, RunError> {
        let (mut store, pipes) = self.component_store(pre.instance_pre().engine(), &inv)?;
        let max_memory = self.memory_limit(&inv.limits);
        let result = match pre.instantiate_async(&mut store).await {
            Ok(cmd) => cmd.wasi_cli_run().call_run(&mut store).await,
            Err(e) => Err(e),
        };
        let refused = store.data().limiter.refused;
        drop(store);
        let stderr = pipes.stderr();
        let exit_code = match result {
            Ok(Ok(())) => 0,
            // `run` returned its error variant: exit code 1, as wasmtime's CLI reports it.
            Ok(Err(())) => 1,
            Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(wasmtime_wasi::I32Exit(code)) => *code,
                None => return Err(failure(e, refused, max_memory, stderr)),
            },
        };
        Ok(Outcome {
            exit_code,
            stdout: pipes.stdout(),
            stderr,
        })
    }

    /// Serves one HTTP request with a fresh instance of an HTTP handler component. The request
    /// body streams into the guest and the response body streams out of it; the deadline covers
    /// both (a response cut by it ends with an error, so the client sees it incomplete). Only
    /// `inv`'s env, args, preopens, allow-list, stdout/stderr streams and timeout are used.
    /// `held` (the pod's instance slot) is kept exactly as long as the instance: until the guest
    /// returns or its deadline cuts it, not as long as a slow client takes to read the body.
    /// Why a body was cut after its head is written to `inv.stderr` when that is a line sink.
    pub async fn serve_http<B>(
        &self,
        program: &Program,
        req: http::Request<B>,
        inv: Invocation,
        held: impl Send + 'static,
    ) -> Result<http::Response<ComponentBody>, RunError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Compiled::Http(pre) = &program.compiled else {
            return Err(RunError::NotHttp(program.kind()));
        };
        let timeout = inv.timeout;
        let late_log = match &inv.stderr {
            Stream::Lines(sink) => Some(sink.clone()),
            _ => None,
        };
        let (mut store, pipes) = self.component_store(pre.instance_pre().engine(), &inv)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let setup = |e: wasmtime::Error| RunError::Setup(format!("{e:#}"));
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(setup)?;
        let out = store
            .data_mut()
            .http()
            .new_response_outparam(tx)
            .map_err(setup)?;
        let pre = pre.clone();
        let max_memory = self.memory_limit(&inv.limits);
        let meter = inv.meter.clone();
        let guest = async move {
            let result = match pre.instantiate_async(&mut store).await {
                Ok(proxy) => {
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, req, out)
                        .await
                }
                Err(e) => Err(e),
            };
            let refused = store.data().limiter.refused;
            drop(store);
            result.map_err(|e| failure(e, refused, max_memory, pipes.stderr()))
        };
        let guest = crate::usage::Metered::new(guest, meter);
        // `held` (the pod's slot) goes with the instance, and the deadline covers it all.
        let mut guest = Box::pin(async move {
            let _held = held;
            match timeout {
                Some(t) => tokio::time::timeout(t, guest)
                    .await
                    .unwrap_or(Err(RunError::Timeout(t))),
                None => guest.await,
            }
        });
        // The guest runs inside this request's task until its response head is set: most
        // handlers set the head, write a short body and return in that one run, so no task is
        // spawned and no other thread is woken for them. `None`: no head will come (the guest
        // ended, or dropped its response-outparam unset).
        let mut ended = None;
        let mut rx = rx;
        let head = std::future::poll_fn(|cx| {
            if ended.is_none()
                && let std::task::Poll::Ready(r) = guest.as_mut().poll(cx)
            {
                ended = Some(r);
            }
            match std::pin::Pin::new(&mut rx).poll(cx) {
                std::task::Poll::Ready(r) => std::task::Poll::Ready(r.ok()),
                std::task::Poll::Pending if ended.is_some() => std::task::Poll::Ready(None),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
        .await;
        match head {
            Some(Ok(resp)) => {
                let abort = match ended {
                    // The body is written (it waits in the channel) and the store is gone.
                    Some(Ok(())) => None,
                    Some(Err(e)) => {
                        if let Some(log) = &late_log {
                            log.line(
                                format!("wasinode: the module failed after setting its response head: {e}")
                                    .as_bytes(),
                            );
                        }
                        None
                    }
                    // Still writing its body: the rest runs in its own task, under the same
                    // deadline, so that a client that stops reading holds no instance past it.
                    None => {
                        let task = tokio::spawn(async move {
                            let ended = guest.await;
                            if let (Err(e), Some(log)) = (&ended, &late_log) {
                                log.line(
                                    format!("wasinode: the response was cut after its head was sent: {e}")
                                        .as_bytes(),
                                );
                            }
                        });
                        Some(task.abort_handle())
                    }
                };
                // The response owns the task from now on: a client that goes away stops the guest.
                Ok(resp.map(|body| AbortOnDrop { body, abort }.boxed_unsync()))
            }
            Some(Err(code)) => Err(RunError::GuestHttp(format!("{code:?}"))),
            None => match ended {
                Some(r) => r.and(Err(RunError::NoResponse)),
                // The outparam was dropped unset while the guest goes on: its end says why.
                None => guest.await.and(Err(RunError::NoResponse)),
            },
        }
    }
}

/// Captured stdout/stderr of one component store, read once the store is gone.
pub(crate) struct Pipes {
    stdout: Option<wasmtime_wasi::p2::pipe::MemoryOutputPipe>,
    stderr: Option<wasmtime_wasi::p2::pipe::MemoryOutputPipe>,
}

impl Pipes {
    fn stdout(&self) -> Bytes {
        crate::run::captured(self.stdout.clone())
    }
    fn stderr(&self) -> Bytes {
        crate::run::captured(self.stderr.clone())
    }
}

/// What a failed component call was, for the caller and the container log.
pub(crate) fn failure(e: wasmtime::Error, refused: bool, limit: usize, stderr: Bytes) -> RunError {
    if refused {
        return RunError::MemoryLimit { limit, stderr };
    }
    if pool_full(&e) {
        return RunError::Busy;
    }
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    };
    RunError::Trap { message, stderr }
}

/// A response body that stops the guest task writing it when the body is dropped.
struct AbortOnDrop {
    body: HyperOutgoingBody,
    /// The task still running the guest, if its body was not written by the time the head was.
    abort: Option<tokio::task::AbortHandle>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(a) = &self.abort {
            a.abort();
        }
    }
}

impl http_body::Body for AbortOnDrop {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
