//! The agent's Prometheus metrics (`/metrics` on the kubelet API, `wasinode run
//! --metrics-address`), in the Prometheus text format (0.0.4) through `prometheus-client`.
//!
//! Every label value comes from a pod the node runs (namespace, pod, container, and the route
//! pattern as configured, never a request's path), and a pod's series are removed when it stops,
//! so cardinality is bounded by the pods and their routes. The request path touches only
//! handles made when the pod started ([`RouteMetrics`]): two counter adds, a histogram
//! observation, a gauge up and down.
//!
//! Series:
//! - `wasinode_http_requests_total{namespace,pod,route,code_class}`: answered requests by status
//!   class (`2xx`, ..., `5xx`); route `""` for paths no route matched.
//! - `wasinode_http_request_duration_seconds{namespace,pod,route}`: time to the response head.
//! - `wasinode_http_requests_in_flight{namespace,pod}`.
//! - `wasinode_instances{namespace,pod,container}`: live instances (a WASI 0.3 service's pooled
//!   instances, the requests' and commands' own).
//! - `wasinode_guest_traps_total`, `wasinode_guest_timeouts_total`,
//!   `wasinode_guest_memory_limit_hits_total` `{namespace,pod,container}`.
//! - `wasinode_image_pull_duration_seconds`, `wasinode_module_compile_duration_seconds`.
//! - `wasinode_cpu_throttled_total{namespace,pod,container}`: times an instance waited for its
//!   container's CPU quota (`limits.cpu`).
//! - `wasinode_log_lines_dropped_total{namespace,pod,container}`: lines lost because the log
//!   writer was behind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use runtime::RunError;

use crate::logs::LogStore;
use crate::plan::PodKey;
use crate::usage::Usage;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ContainerLabels {
    namespace: String,
    pod: String,
    container: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct RouteLabels {
    namespace: String,
    pod: String,
    route: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct RequestLabels {
    namespace: String,
    pod: String,
    route: String,
    code_class: &'static str,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A family of series, each a pod's: prometheus-client's `Family`, but kept in a BTreeMap.
/// Removing a deleted pod's series then gives their memory back, where a HashMap keeps the
/// table it grew to (6.4 MiB for the request counters alone, held after a wave of 3,000 pods
/// was deleted: heaptrack, README's Benchmark), and /metrics lists the series in order.
#[derive(Debug)]
struct PodFamily<S, M> {
    series: Arc<Mutex<BTreeMap<S, M>>>,
    new: fn() -> M,
}

impl<S, M> Clone for PodFamily<S, M> {
    fn clone(&self) -> Self {
        PodFamily {
            series: self.series.clone(),
            new: self.new,
        }
    }
}

impl<S: Ord + Clone, M: Clone> PodFamily<S, M> {
    fn new(new: fn() -> M) -> Self {
        PodFamily {
            series: Arc::default(),
            new,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<S, M>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The series of `labels`, made now if there is none.
    fn get_or_create_owned(&self, labels: &S) -> M {
        let mut series = self.lock();
        if let Some(m) = series.get(labels) {
            return m.clone();
        }
        series
            .entry(labels.clone())
            .or_insert_with(self.new)
            .clone()
    }

    fn remove(&self, labels: &S) {
        self.lock().remove(labels);
    }
}

impl<S, M: TypedMetric> TypedMetric for PodFamily<S, M> {
    const TYPE: MetricType = M::TYPE;
}

impl<S, M> EncodeMetric for PodFamily<S, M>
where
    S: Ord + Clone + EncodeLabelSet,
    M: Clone + EncodeMetric + TypedMetric,
{
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for (labels, m) in self.lock().iter() {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

fn latency() -> Histogram {
    // 100 µs to about 100 s.
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

fn slow() -> Histogram {
    // 1 ms to about 10 min.
    Histogram::new(exponential_buckets(0.001, 2.5, 15))
}

/// One container's failure counters.
#[derive(Clone, Debug, Default)]
pub struct ContainerMetrics {
    traps: Counter,
    timeouts: Counter,
    memory_limit: Counter,
}

impl ContainerMetrics {
    /// Counts an invocation that failed as `e` says.
    pub fn failed(&self, e: &RunError) {
        match e {
            RunError::Trap { .. } => self.traps.inc(),
            RunError::Timeout(_) => self.timeouts.inc(),
            RunError::MemoryLimit { .. } => self.memory_limit.inc(),
            _ => 0,
        };
    }
}

/// What one route of one pod counts, resolved when the pod starts.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    pub container: Option<ContainerMetrics>,
}

impl RouteMetrics {
    /// Counts one answered request.
    pub fn answered(&self, status: StatusCode, took: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(took.as_secs_f64());
    }
}

/// A pod's in-flight requests, one up while the guard lives.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Gauge);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.0.inc();
        InFlightGuard(&self.0)
    }
}

pub struct InFlightGuard<'a>(&'a Gauge);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The label sets a pod's series were made with, to remove them when it stops.
#[derive(Default)]
struct PodSeries {
    routes: Vec<RouteLabels>,
    containers: Vec<ContainerLabels>,
    pod: bool,
}

struct Inner {
    registry: Registry,
    requests: PodFamily<RequestLabels, Counter>,
    duration: PodFamily<RouteLabels, Histogram>,
    in_flight: PodFamily<PodLabels, Gauge>,
    traps: PodFamily<ContainerLabels, Counter>,
    timeouts: PodFamily<ContainerLabels, Counter>,
    memory_limit: PodFamily<ContainerLabels, Counter>,
    pulls: Histogram,
    compiles: Histogram,
    series: Mutex<BTreeMap<PodKey, PodSeries>>,
}

/// The agent's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Figures read from the pods at each scrape: live instances and dropped log lines.
struct PerContainer {
    usage: Usage,
    logs: LogStore,
}

impl std::fmt::Debug for PerContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerContainer")
    }
}

impl Collector for PerContainer {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut pods = self.usage.pods();
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        let labels = |key: &PodKey, c: &str| ContainerLabels {
            namespace: key.namespace.clone(),
            pod: key.name.clone(),
            container: c.to_string(),
        };
        {
            let mut fam = encoder.encode_descriptor(
                "instances",
                "Instances alive now, pooled ones included",
                None,
                MetricType::Gauge,
            )?;
            for p in &pods {
                for c in &p.containers {
                    let l = labels(&p.key, &c.name);
                    ConstGauge::new(c.meter.instances() as i64).encode(fam.encode_family(&l)?)?;
                }
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "cpu_throttled",
                "Times an instance waited because its container's CPU quota (limits.cpu) was spent",
                None,
                MetricType::Counter,
            )?;
            for p in &pods {
                for c in &p.containers {
                    let l = labels(&p.key, &c.name);
                    ConstCounter::new(c.meter.throttled()).encode(fam.encode_family(&l)?)?;
                }
            }
        }
        let mut fam = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because the log writer was behind",
            None,
            MetricType::Counter,
        )?;
        for p in &pods {
            for c in &p.containers {
                let n = self.logs.lines_dropped(&p.key, &c.name).unwrap_or(0);
                let l = labels(&p.key, &c.name);
                ConstCounter::new(n).encode(fam.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(usage: Usage, logs: LogStore) -> Metrics {
        let mut registry = Registry::with_prefix("wasinode");
        let requests = PodFamily::<RequestLabels, Counter>::new(Counter::default);
        let duration = PodFamily::<RouteLabels, Histogram>::new(latency);
        let in_flight = PodFamily::<PodLabels, Gauge>::new(Gauge::default);
        let traps = PodFamily::<ContainerLabels, Counter>::new(Counter::default);
        let timeouts = PodFamily::<ContainerLabels, Counter>::new(Counter::default);
        let memory_limit = PodFamily::<ContainerLabels, Counter>::new(Counter::default);
        let pulls = slow();
        let compiles = slow();
        registry.register(
            "http_requests",
            "HTTP requests answered, by pod, route pattern and status class",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request to its response head, by pod and route pattern",
            duration.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being served now",
            in_flight.clone(),
        );
        registry.register(
            "guest_traps",
            "Invocations that ended in a trap",
            traps.clone(),
        );
        registry.register(
            "guest_timeouts",
            "Invocations cut by their deadline",
            timeouts.clone(),
        );
        registry.register(
            "guest_memory_limit_hits",
            "Invocations that failed at their memory limit",
            memory_limit.clone(),
        );
        registry.register(
            "image_pull_duration_seconds",
            "Time to fetch a container's image (registry pull, cache or local file)",
            pulls.clone(),
        );
        registry.register(
            "module_compile_duration_seconds",
            "Time to compile and link a module or component not yet loaded",
            compiles.clone(),
        );
        registry.register_collector(Box::new(PerContainer { usage, logs }));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                duration,
                in_flight,
                traps,
                timeouts,
                memory_limit,
                pulls,
                compiles,
                series: Mutex::default(),
            }),
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry)
        {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }

    fn remember(&self, key: &PodKey, f: impl FnOnce(&mut PodSeries)) {
        let mut series = self.inner.series.lock().unwrap_or_else(|p| p.into_inner());
        f(series.entry(key.clone()).or_default());
    }

    /// The failure counters of a container.
    pub fn container(&self, key: &PodKey, container: &str) -> ContainerMetrics {
        let l = ContainerLabels {
            namespace: key.namespace.clone(),
            pod: key.name.clone(),
            container: container.to_string(),
        };
        let m = ContainerMetrics {
            traps: self.inner.traps.get_or_create_owned(&l),
            timeouts: self.inner.timeouts.get_or_create_owned(&l),
            memory_limit: self.inner.memory_limit.get_or_create_owned(&l),
        };
        self.remember(key, |s| {
            if !s.containers.contains(&l) {
                s.containers.push(l);
            }
        });
        m
    }

    /// The counters of route `route` (its pattern as declared) of a pod, served by `container`.
    pub fn route(&self, key: &PodKey, route: &str, container: Option<&str>) -> RouteMetrics {
        let l = RouteLabels {
            namespace: key.namespace.clone(),
            pod: key.name.clone(),
            route: route.to_string(),
        };
        let by_class = CLASSES.map(|code_class| {
            self.inner.requests.get_or_create_owned(&RequestLabels {
                namespace: l.namespace.clone(),
                pod: l.pod.clone(),
                route: l.route.clone(),
                code_class,
            })
        });
        let m = RouteMetrics {
            by_class,
            duration: self.inner.duration.get_or_create_owned(&l),
            container: container.map(|c| self.container(key, c)),
        };
        self.remember(key, |s| {
            if !s.routes.contains(&l) {
                s.routes.push(l);
            }
        });
        m
    }

    /// A pod's in-flight gauge.
    pub fn in_flight(&self, key: &PodKey) -> InFlight {
        let l = PodLabels {
            namespace: key.namespace.clone(),
            pod: key.name.clone(),
        };
        self.remember(key, |s| s.pod = true);
        InFlight(self.inner.in_flight.get_or_create_owned(&l))
    }

    pub fn pulled(&self, took: Duration) {
        self.inner.pulls.observe(took.as_secs_f64());
    }

    pub fn compiled(&self, took: Duration) {
        self.inner.compiles.observe(took.as_secs_f64());
    }

    /// Removes every series of a pod that stopped.
    pub fn remove_pod(&self, key: &PodKey) {
        let gone = {
            let mut series = self.inner.series.lock().unwrap_or_else(|p| p.into_inner());
            series.remove(key)
        };
        let Some(s) = gone else { return };
        let i = &self.inner;
        for r in &s.routes {
            for code_class in CLASSES {
                i.requests.remove(&RequestLabels {
                    namespace: r.namespace.clone(),
                    pod: r.pod.clone(),
                    route: r.route.clone(),
                    code_class,
                });
            }
            i.duration.remove(r);
        }
        for c in &s.containers {
            i.traps.remove(c);
            i.timeouts.remove(c);
            i.memory_limit.remove(c);
        }
        if s.pod {
            i.in_flight.remove(&PodLabels {
                namespace: key.namespace.clone(),
                pod: key.name.clone(),
            });
        }
    }
}

/// Connections the standalone metrics listener serves at once; more wait to be accepted.
const METRICS_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` (the standalone `--metrics-address`), plain HTTP/1.1,
/// until the task is dropped. Other paths are 404; at most [`METRICS_CONNECTIONS`] connections
/// at once, each one's request head within 10 s.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use http_body_util::Full;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let found = req.uri().path() == "/metrics" && req.method() == http::Method::GET;
                    let resp = if found {
                        let mut r =
                            http::Response::new(Full::new(bytes::Bytes::from(metrics.encode())));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(CONTENT_TYPE),
                        );
                        r
                    } else {
                        let mut r = http::Response::new(Full::new(bytes::Bytes::from_static(
                            b"not found\n",
                        )));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    };
                    std::future::ready(Ok::<_, std::convert::Infallible>(resp))
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PodKey {
        PodKey {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u1".into(),
        }
    }

    #[test]
    fn a_stopped_pods_series_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Metrics::new(Usage::default(), LogStore::start(dir.path().into(), false));
        let r = m.route(&key(), "/hello", Some("hello"));
        r.answered(StatusCode::OK, Duration::from_millis(3));
        r.container
            .as_ref()
            .expect("container")
            .failed(&RunError::Timeout(Duration::from_secs(1)));
        let in_flight = m.in_flight(&key());
        let _f = in_flight.enter();
        let text = m.encode();
        assert!(
            text.contains(
                "wasinode_http_requests_total{namespace=\"default\",pod=\"web\",route=\"/hello\",code_class=\"2xx\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("wasinode_guest_timeouts_total{namespace=\"default\",pod=\"web\",container=\"hello\"} 1"), "{text}");
        m.remove_pod(&key());
        let text = m.encode();
        assert!(!text.contains("pod=\"web\""), "{text}");
    }
}
