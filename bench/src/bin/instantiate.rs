//! instantiate: the cost of one WAGI request's per-request work, measured with the runtime crate
//! directly (no HTTP): build the CGI environment, instantiate-and-run the module with captured
//! stdout/stderr (what `wasinode run` does per request), and parse the CGI response.
//!
//! Usage: `instantiate [MODULE.wasm] [RUNS]` (defaults: `target/guests/hello.wasm`, 2000).
//! Prints mean/p50/p99 in microseconds for each step after a warm-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use runtime::{AllowList, Invocation, Runtime, RuntimeConfig, Stream};
use wagi::routes::RoutePattern;

const WARMUP: usize = 200;

/// The wasinode binary's allocator (crates/cli/src/main.rs), so this measures the path it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Stats {
    mean: f64,
    p50: f64,
    p99: f64,
    min: f64,
}

fn stats(samples: &mut [Duration]) -> Stats {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = samples.len();
    let pick = |q: f64| us(samples[((n as f64 * q).ceil() as usize).clamp(1, n) - 1]);
    Stats {
        mean: samples.iter().map(|d| us(*d)).sum::<f64>() / n as f64,
        p50: pick(0.50),
        p99: pick(0.99),
        min: us(samples[0]),
    }
}

/// The request headers wrk sends, plus the few a browser or proxy typically adds.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:18081"),
        ("user-agent", "wrk/4.1.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-request-id", "0123456789abcdef"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn main() -> anyhow::Result<()> {
    // As the wasinode binary does, so that the heap under the measured path is backed as there.
    runtime::no_transparent_huge_pages().context("turning transparent huge pages off")?;
    let mut argv = std::env::args().skip(1);
    let path = argv
        .next()
        .unwrap_or_else(|| "target/guests/hello.wasm".to_string());
    let runs: usize = match argv.next() {
        Some(n) => n.parse().context("RUNS must be a number")?,
        None => 2000,
    };
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {path}"))?;

    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio_rt.block_on(async move {
        // INSTANTIATE_INSTANCES=N: a smaller pool (valgrind cannot reserve the default's
        // terabytes of address space).
        let mut config = RuntimeConfig::default();
        if let Some(n) = std::env::var("INSTANTIATE_INSTANCES")
            .ok()
            .and_then(|n| n.parse().ok())
        {
            config.max_instances = n;
        }
        let rt = Runtime::new(config)?;
        let load_start = Instant::now();
        let program = rt.load("sha256:instantiate-bench", &bytes)?;
        let load = load_start.elapsed();

        let pattern = RoutePattern::parse("/hello")?;
        let method = Method::GET;
        let uri: Uri = "/hello".parse()?;
        let headers = request_headers();
        let remote: SocketAddr = "127.0.0.1:40000".parse()?;
        let local: SocketAddr = "127.0.0.1:18081".parse()?;
        let allowed = Arc::new(AllowList::deny_all());
        let pod_env: runtime::Environ = [("POD_NAME", "bench")].into_iter().collect();
        // INSTANTIATE_METER=1: every run charged to a container's meter, as pods are.
        let meter = std::env::var_os("INSTANTIATE_METER").map(|_| runtime::Meter::new());
        if meter.is_some() {
            let n = 1_000_000;
            let t = Instant::now();
            let mut x = 0;
            for _ in 0..n {
                x ^= std::hint::black_box(runtime::usage::thread_cpu_ns());
            }
            std::hint::black_box(x);
            let cpu_clock = t.elapsed().as_secs_f64() * 1e9 / n as f64;
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(Instant::now());
            }
            println!(
                "clock reads: thread CPU {cpu_clock:.0} ns, monotonic {:.0} ns",
                t.elapsed().as_secs_f64() * 1e9 / n as f64
            );
        }

        let mut env_t = Vec::with_capacity(runs);
        let mut run_t = Vec::with_capacity(runs);
        let mut parse_t = Vec::with_capacity(runs);
        let mut total_t = Vec::with_capacity(runs);
        let mut env_len = 0;
        for i in 0..WARMUP + runs {
            let t0 = Instant::now();
            let meta = wagi::cgi::RequestMeta {
                method: &method,
                uri: &uri,
                version: Version::HTTP_11,
                headers: &headers,
                body_len: 0,
                remote_addr: remote,
                local_addr: local,
                scheme: "http",
            };
            let env =
                workload::serve::request_environ(&pod_env, &meta, &pattern, "", "wasinode-bench");
            env_len = env.len();
            let inv = Invocation {
                entrypoint: "_start".to_string(),
                args: wagi::cgi::argv(pattern.script_name(), uri.query()),
                env,
                stdin: Bytes::new(),
                stdout: Stream::Capture { limit: 32 << 20 },
                stderr: Stream::Capture { limit: 1 << 20 },
                preopens: Vec::new(),
                allowed_hosts: allowed.clone(),
                timeout: Some(Duration::from_secs(30)),
                meter: meter.clone(),
                ..Invocation::new("_start")
            };
            let t1 = Instant::now();
            let out = rt.run(&program, inv).await?;
            let t2 = Instant::now();
            let cgi = wagi::response::parse(&out.stdout)?;
            let body = out.stdout.slice(cgi.body_offset..);
            let t3 = Instant::now();
            if out.exit_code != 0 || &body[..] != b"hello world\n" && path.ends_with("hello.wasm") {
                bail!(
                    "unexpected output (exit {}): {:?}",
                    out.exit_code,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            if i >= WARMUP {
                env_t.push(t1 - t0);
                run_t.push(t2 - t1);
                parse_t.push(t3 - t2);
                total_t.push(t3 - t0);
            }
        }

        println!(
            "instantiate-and-run of {path}: {runs} runs after {WARMUP} warm-up, one at a time, \
             {env_len} env vars, captured stdout/stderr (compile+link once: {:.1} ms)",
            load.as_secs_f64() * 1e3
        );
        println!(
            "  {:<34} {:>9} {:>9} {:>9} {:>9}",
            "step (µs)", "mean", "p50", "p99", "min"
        );
        for (name, samples) in [
            ("CGI environment + argv", &mut env_t),
            ("instantiate + run (Runtime::run)", &mut run_t),
            ("parse CGI response", &mut parse_t),
            ("total per request", &mut total_t),
        ] {
            let s = stats(samples);
            println!(
                "  {:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name, s.mean, s.p50, s.p99, s.min
            );
        }
        if let Some(m) = &meter {
            println!(
                "meter: {:.1} µs CPU per run, {} bytes held after the runs",
                m.cpu_ns() as f64 / 1e3 / (WARMUP + runs) as f64,
                m.instances_bytes()
            );
        }
        let s = stats(&mut run_t);
        println!(
            "INSTANTIATE_US mean={:.1} p50={:.1} p99={:.1}",
            s.mean, s.p50, s.p99
        );
        Ok(())
    })
}
