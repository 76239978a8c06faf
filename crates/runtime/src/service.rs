//! WASI 0.3 HTTP services (`wasi:http/handler@0.3.x`, the `wasi:http/service` world): unlike a
//! 0.2 handler, an instance may serve several requests at once, so instances are kept and
//! reused. wasmtime-wasi-http's `ProxyHandler` does the dispatching (a queue of requests, workers
//! that each own one store and instance); this module says when a worker takes a request, when
//! a request has expired and when an instance retires:
//! - at most `concurrency` requests at once per instance, and `max_requests` in its life;
//! - a request not answered by its deadline fails (504), and an instance that still has a
//!   request past its deadline is retired (the guest may be spinning in it);
//! - an instance idle for `idle_timeout` is retired; a trap retires it and fails only the
//!   requests it held;
//! - stopping the service (its pod) retires every instance.
//!
//! A service keeps one such pool per lane (the agent's serving threads, see `lanes`): a
//! request is served by the instances of the lane it arrives on, so the request, its instance
//! and its response stay on one core and no other thread is woken for it. With one pool for
//! all, the requests of every other thread crossed to the thread whose task held the instance
//! and back: in an alternating A/B (`wrk -t1 -c16`, 2 cores) p99 was 2.1-7.1 ms with one pool
//! and 1.2-1.6 ms with one per thread, throughput 3.7% higher on the mean, CPU per request the
//! same within the noise (README, Benchmark).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use wasmtime::component::GuestTaskId;
use wasmtime::{Store, StoreContextMut};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::{
    ExpirationError, HandlerState, Instance, InstantiationError, Proxy, ProxyHandler, ShouldAccept,
    TrapOrPanicError, WorkerExpiration, WorkerState, WorkerStatus,
};
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::component::{ComponentBody, ComponentHost, failure};
use crate::engine::{Compiled, Program, Runtime};
use crate::output::LineSink;
use crate::run::{Invocation, RunError, pool_full};

/// How a service's instances are reused.
#[derive(Clone, Copy, Debug)]
pub struct ServiceLimits {
    /// Requests one instance serves at once.
    pub concurrency: usize,
    /// Requests one instance serves in its life before it is retired.
    pub max_requests: usize,
    /// An instance with nothing to do for this long is retired.
    pub idle_timeout: Duration,
    /// A request not answered within this fails; an instance holding such a request retires.
    pub request_timeout: Duration,
    /// Pools of instances kept apart, one per serving thread (at least 1): [`Service::handle`]
    /// serves a request from the pool of the lane it names.
    pub lanes: usize,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_requests: 10_000,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            lanes: 1,
        }
    }
}

/// The running instances of one container's 0.3 service. Cheap to clone; [`Service::stop`]
/// (or dropping the last clone's pod) retires every instance.
#[derive(Clone)]
pub struct Service {
    /// One pool per lane; every pool makes its instances from the same state.
    lanes: Arc<[ProxyHandler<Shared>]>,
    stop: CancellationToken,
}

/// What every lane's pool makes its instances from.
#[derive(Clone)]
struct Shared(Arc<ServiceState>);

struct ServiceState {
    runtime: Runtime,
    pre: ServicePre<ComponentHost>,
    /// What every instance runs with (env, preopens, allow-list, log streams); no deadline: each
    /// request has its own.
    template: Invocation,
    limits: ServiceLimits,
    stop: CancellationToken,
    log: Option<Arc<dyn LineSink>>,
}

impl Runtime {
    /// Starts serving a 0.3 HTTP service program: instances are made on demand and reused.
    /// `inv` gives what every instance runs with; its `timeout` is ignored (see `limits`).
    /// `log` is told why instances retire after a failure.
    pub fn service(
        &self,
        program: &Program,
        inv: Invocation,
        limits: ServiceLimits,
        log: Option<Arc<dyn LineSink>>,
    ) -> Result<Service, RunError> {
        let Compiled::Service(pre) = &program.compiled else {
            return Err(RunError::NotHttp(program.kind()));
        };
        let stop = CancellationToken::new();
        let mut template = inv;
        template.timeout = None;
        let state = ServiceState {
            runtime: self.clone(),
            pre: pre.clone(),
            template,
            limits,
            stop: stop.clone(),
            log,
        };
        let shared = Shared(Arc::new(state));
        let lanes = (0..limits.lanes.max(1))
            .map(|_| ProxyHandler::new(shared.clone()))
            .collect();
        Ok(Service { lanes, stop })
    }
}

impl Service {
    /// Serves one request on a reused (or new) instance of `lane`'s pool (taken modulo the
    /// number of lanes).
    pub async fn handle<B>(
        &self,
        lane: usize,
        req: http::Request<B>,
    ) -> Result<http::Response<ComponentBody>, RunError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        if self.stop.is_cancelled() {
            return Err(RunError::Busy);
        }
        let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
        let handler = &self.lanes[lane % self.lanes.len()];
        let timeout = handler.state().0.limits.request_timeout;
        // Also bounded here: a request queued behind busy instances is not left waiting.
        let handled = tokio::time::timeout(timeout, handler.handle((), req)).await;
        match handled {
            Err(_) => Err(RunError::Timeout(timeout)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.classify(e, timeout)),
        }
    }

    fn classify(&self, e: wasmtime::Error, timeout: Duration) -> RunError {
        if e.is::<ExpirationError>() {
            return RunError::Timeout(timeout);
        }
        if e.is::<TrapOrPanicError>() {
            return RunError::Trap {
                message: "the instance serving the request trapped (it is retired)".into(),
                stderr: bytes::Bytes::new(),
            };
        }
        if let Some(ie) = e.downcast_ref::<InstantiationError<()>>() {
            return if pool_full(&ie.error) {
                RunError::Busy
            } else {
                RunError::Setup(format!("{:#}", ie.error))
            };
        }
        match e.downcast_ref::<wasmtime_wasi_http::p3::bindings::http::types::ErrorCode>() {
            Some(code) => RunError::GuestHttp(format!("{code:?}")),
            None => failure(e, false, 0, bytes::Bytes::new()),
        }
    }

    /// Retires every instance: they take no more requests and end once idle (their in-flight
    /// requests are cut by the pod's own stop).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl HandlerState for Shared {
    type StoreData = ComponentHost;
    type WorkerExpiration = Expiration;
    type WorkerState = Worker;

    async fn instantiate(&self) -> wasmtime::Result<Instance<ComponentHost, Expiration, Worker>> {
        self.0.instantiate().await
    }
}

impl ServiceState {
    async fn instantiate(&self) -> wasmtime::Result<Instance<ComponentHost, Expiration, Worker>> {
        let (mut store, _pipes) = self
            .runtime
            .component_store(self.pre.instance_pre().engine(), &self.template)
            .map_err(wasmtime::Error::new)?;
        // The handler polls a service's requests in tasks of its own, which cannot be timed as
        // other invocations are; its CPU is counted at the epoch ticks instead: every tick the
        // instance sees while it runs wasm adds one tick of CPU time to its container (an
        // unbiased estimate of the time spent in the guest, nothing per request).
        let (cpu, meter) = (
            self.template.limits.cpu.clone(),
            self.template.meter.clone(),
        );
        let tick = self.runtime.config().epoch_tick.as_nanos() as u64;
        store.epoch_deadline_callback(move |_| {
            if let Some(m) = &meter {
                m.add_cpu_ns(tick);
            }
            Ok(crate::quota::on_tick(cpu.as_ref(), meter.as_ref()))
        });
        let service = tokio::time::timeout(
            self.limits.request_timeout,
            self.pre.instantiate_async(&mut store),
        )
        .await
        .map_err(|_| {
            wasmtime::format_err!("instantiation took longer than the request timeout")
        })??;
        Ok(Instance {
            store,
            proxy: Proxy::P3(service),
            view: <ComponentHost as WasiHttpView>::http,
            expiration: Expiration {
                limits: self.limits,
                stopped: Box::pin(self.stop.clone().cancelled_owned()),
                timer: None,
            },
            state: Worker {
                limits: self.limits,
                stop: self.stop.clone(),
                log: self.log.clone(),
                max_memory: self.runtime.memory_limit(&self.template.limits),
            },
        })
    }
}

struct Worker {
    limits: ServiceLimits,
    stop: CancellationToken,
    log: Option<Arc<dyn LineSink>>,
    max_memory: usize,
}

impl WorkerState for Worker {
    type StoreData = ComponentHost;
    type RequestData = ();

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        if self.stop.is_cancelled() || total >= self.limits.max_requests {
            ShouldAccept::Never
        } else if concurrent < self.limits.concurrency {
            ShouldAccept::Yes
        } else {
            ShouldAccept::No
        }
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, ComponentHost>,
        _data: (),
        _task: GuestTaskId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
        Box::pin(tokio::time::sleep(self.limits.request_timeout))
    }

    fn drop(&self, store: Store<ComponentHost>, result: wasmtime::Result<()>) {
        let refused = store.data().limiter.refused;
        drop(store);
        if let (Err(e), Some(log)) = (result, &self.log) {
            let why = failure(e, refused, self.max_memory, bytes::Bytes::new());
            log.line(
                format!("wasinode: a wasi:http service instance was retired: {why}").as_bytes(),
            );
        }
    }
}

/// When an instance retires: idle too long, holding a request past its deadline, or stopped.
struct Expiration {
    limits: ServiceLimits,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WorkerExpiration for Expiration {
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        state: WorkerStatus,
        start: Instant,
    ) -> Poll<()> {
        if self.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let limit = match state {
            WorkerStatus::Idle => self.limits.idle_timeout,
            WorkerStatus::Requests => self.limits.request_timeout,
            // Work after the responses: it gets a request's time too.
            WorkerStatus::PostReturn => self.limits.request_timeout,
        };
        let at = start + limit;
        let now = Instant::now();
        if now >= at {
            return Poll::Ready(());
        }
        // The deadline moves with every request (idle since its end, busy since its start), but
        // the timer is moved only when the deadline comes sooner than it, or once it has fired:
        // one that fires early wakes this poll, which arms it for the deadline of then. So a
        // busy instance re-arms about once per timeout, not twice per request.
        let at = tokio::time::Instant::from_std(at);
        match &mut self.timer {
            Some(sleep) if at < sleep.deadline() || sleep.deadline() <= now.into() => {
                sleep.as_mut().reset(at);
            }
            Some(_) => {}
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        match &mut self.timer {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}
