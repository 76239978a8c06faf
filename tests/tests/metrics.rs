//! Prometheus metrics of `wasinode run --metrics-address`: the text at `/metrics` parses, has
//! the series of every route, container and operation the agent reports, and they move as
//! requests are answered, guests trap, time out and hit their memory limit. Label values are
//! the pod's own (route patterns as declared, never a request's path).
//!
//! Run: `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test metrics`

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::guests::{guest, wat};
use e2e::wasinode::{free_port, get, listening, run_one};

const T: Duration = Duration::from_secs(60);

/// A sample's name and sorted labels.
type Series = (String, Vec<(String, String)>);

/// `(name, labels) -> value` of every sample of a Prometheus text exposition.
fn parse(text: &str) -> Result<HashMap<Series, f64>> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("no value")?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("value of {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').context("unclosed labels")?;
                let mut labels: Vec<(String, String)> = l
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap_or((kv, ""));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                labels.sort();
                (n.to_string(), labels)
            }
            None => (series.to_string(), vec![]),
        };
        out.insert((name, labels), value);
    }
    Ok(out)
}

struct Scrape(HashMap<Series, f64>);

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        self.0.get(&(name.to_string(), l)).copied()
    }

    fn has(&self, name: &str) -> bool {
        self.0.keys().any(|(n, _)| n == name)
    }
}

fn scrape(metrics: &str) -> Result<Scrape> {
    let r = get(metrics, "/metrics")?;
    ensure!(r.status == 200, "/metrics: HTTP {}: {}", r.status, r.body);
    ensure!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "content type {:?}",
        r.header("content-type")
    );
    Ok(Scrape(parse(&r.body).with_context(|| r.body.clone())?))
}

fn pod(addr: &str, routes: &[(&str, &str, &Path)]) -> String {
    let modules: Vec<String> = routes
        .iter()
        .map(|(c, route, _)| format!(r#""{c}": {{"route": "{route}"}}"#))
        .collect();
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{addr}\"\n    alpha.wagi.krustlet.dev/modules: '{{{}}}'\nspec:\n  containers:\n",
        modules.join(", ")
    );
    for (c, _, image) in routes {
        y.push_str(&format!(
            "    - name: {c}\n      image: file://{}\n",
            image.display()
        ));
    }
    y
}

#[test]
fn prometheus_metrics_count_requests_failures_and_operations() -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let (hello, trap, spin, grow) = (guest("hello")?, wat("trap"), wat("loop"), wat("grow"));
    let y = pod(
        &addr,
        &[
            ("hello", "/hello/...", &hello),
            ("trap", "/trap", &trap),
            ("spin", "/spin", &spin),
            ("grow", "/grow", &grow),
        ],
    );
    let (mut w, _d) = run_one(
        &y,
        &[
            "--quiet",
            "--request-timeout",
            "1s",
            "--max-memory",
            "32MiB",
            "--metrics-address",
            &metrics,
        ],
    )?;
    w.wait_listening(&addr, T)?;
    ensure!(listening(&metrics), "nothing on --metrics-address");

    let pod = [("namespace", "default"), ("pod", "web")];
    let route = |r: &'static str, class: &'static str| {
        vec![
            ("namespace", "default"),
            ("pod", "web"),
            ("route", r),
            ("code_class", class),
        ]
    };
    let container =
        |c: &'static str| vec![("namespace", "default"), ("pod", "web"), ("container", c)];

    // Before any request: every route's series at zero, the operations that started the pod.
    let s = scrape(&metrics)?;
    ensure!(
        s.value("wasinode_http_requests_total", &route("/hello/...", "2xx")) == Some(0.0),
        "no zero series for /hello/..."
    );
    ensure!(
        s.value("wasinode_image_pull_duration_seconds_count", &[]) >= Some(4.0),
        "four images fetched"
    );
    ensure!(
        s.value("wasinode_module_compile_duration_seconds_count", &[]) >= Some(1.0),
        "modules compiled"
    );
    ensure!(s.value("wasinode_http_requests_in_flight", &pod) == Some(0.0));
    for c in ["hello", "trap", "spin", "grow"] {
        ensure!(
            s.value("wasinode_instances", &container(c)) == Some(0.0),
            "{c}: instances"
        );
        ensure!(
            s.value("wasinode_log_lines_dropped_total", &container(c)) == Some(0.0),
            "{c}: dropped lines"
        );
    }

    for i in 0..5 {
        let r = get(&addr, &format!("/hello/{i}?q={i}"))?;
        ensure!(r.status == 200, "/hello: {}", r.status);
    }
    ensure!(get(&addr, "/trap")?.status == 500);
    ensure!(get(&addr, "/spin")?.status == 504);
    ensure!(get(&addr, "/grow")?.status == 500);
    ensure!(get(&addr, "/nowhere/at/all")?.status == 404);

    let s = scrape(&metrics)?;
    let want = [
        (
            "wasinode_http_requests_total",
            route("/hello/...", "2xx"),
            5.0,
        ),
        ("wasinode_http_requests_total", route("/trap", "5xx"), 1.0),
        ("wasinode_http_requests_total", route("/spin", "5xx"), 1.0),
        ("wasinode_http_requests_total", route("/grow", "5xx"), 1.0),
        ("wasinode_http_requests_total", route("", "4xx"), 1.0),
        ("wasinode_guest_traps_total", container("trap"), 1.0),
        ("wasinode_guest_timeouts_total", container("spin"), 1.0),
        (
            "wasinode_guest_memory_limit_hits_total",
            container("grow"),
            1.0,
        ),
        ("wasinode_guest_traps_total", container("hello"), 0.0),
        (
            "wasinode_http_request_duration_seconds_count",
            vec![
                ("namespace", "default"),
                ("pod", "web"),
                ("route", "/hello/..."),
            ],
            5.0,
        ),
    ];
    for (name, labels, v) in &want {
        let got = s.value(name, labels);
        ensure!(got == Some(*v), "{name}{labels:?}: {got:?}, want {v}");
    }
    ensure!(
        s.value(
            "wasinode_http_request_duration_seconds_bucket",
            &[
                ("namespace", "default"),
                ("pod", "web"),
                ("route", "/spin"),
                ("le", "+Inf"),
            ]
        ) == Some(1.0),
        "the timed-out request in the histogram"
    );
    // Label values are the pod's, never a request's path.
    ensure!(
        !s.0.keys().any(|(_, l)| l
            .iter()
            .any(|(_, v)| v.contains("nowhere") || v.contains("q="))),
        "a request path became a label value"
    );
    for name in ["wasinode_http_requests_total", "wasinode_instances"] {
        ensure!(s.has(name), "no {name}");
    }

    w.signal("INT")?;
    ensure!(w.wait_exit(T)?.code() == Some(0));
    Ok(())
}

#[test]
fn a_cpu_limit_holds_its_container_back_and_the_metrics_say_how_often() -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let spin = guest("spin")?;
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{addr}\"\n    alpha.wagi.krustlet.dev/modules: '{{\"capped\": {{\"route\": \"/capped\"}}, \"free\": {{\"route\": \"/free\"}}}}'\nspec:\n  containers:\n    - name: capped\n      image: file://{spin}\n      resources: {{limits: {{cpu: 100m}}}}\n    - name: free\n      image: file://{spin}\n",
        spin = spin.display()
    );
    let (mut w, _d) = run_one(&y, &["--quiet", "--metrics-address", &metrics])?;
    w.wait_listening(&addr, T)?;
    // 300 ms of computing: under a tenth of a core the guest must wait at least twice.
    for path in ["/capped?300", "/free?300"] {
        let r = get(&addr, path)?;
        ensure!(r.status == 200, "{path}: {} {}", r.status, r.body);
    }
    let s = scrape(&metrics)?;
    let throttled = |c: &str| {
        s.value(
            "wasinode_cpu_throttled_total",
            &[("namespace", "default"), ("pod", "web"), ("container", c)],
        )
    };
    ensure!(
        throttled("capped").is_some_and(|n| n >= 2.0),
        "capped: {:?}",
        throttled("capped")
    );
    ensure!(
        throttled("free") == Some(0.0),
        "free: {:?}",
        throttled("free")
    );
    w.signal("INT")?;
    ensure!(w.wait_exit(T)?.code() == Some(0));
    Ok(())
}
