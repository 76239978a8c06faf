//! node-bench: `wasinode node` on the real local control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler started by `tools/cluster up`), measured from a client's
//! point of view. Prints figures; asserts no timing. It fails only when something functionally
//! breaks: a pod never becomes Ready, a route does not answer, the Node leaves Ready.
//!
//! 1. bound -> Ready: with the agent Ready and `hello.wasm` already compiled (one warm-up pod
//!    first), `LATENCY_PODS` WAGI pods are created one at a time with `spec.nodeName` set (bound at
//!    creation, tolerating the node's taints), each on its own port. For each: the time from
//!    sending the create request to this process's pod watch seeing `Ready=True` (monotonic clock,
//!    a kube-runtime watcher). Floors measured in the same run, on the same watch: create -> the
//!    watch seeing the pod ADDED (what the agent's own watch can do at best), and a client's status
//!    patch -> the watch seeing it (one status write, the least a kubelet must do). Then
//!    `SCHED_PODS` pods without `nodeName`, placed by kube-scheduler: create -> scheduled and
//!    create -> Ready.
//! 2. `LOAD_PODS` WAGI pods on the node (distinct ports): created `CREATE_CONCURRENCY` at a time,
//!    the time until all are Ready, then `HOLD_SECS` under a round-robin HTTP client on every route
//!    while the Node's Ready condition and Lease are checked and the agent's VmRSS is sampled.
//!    Reported: RSS right after joining, with 0 pods (module compiled, after the first section's pods
//!    were deleted), with all pods at rest, peak under load, and the per-pod increment; then after
//!    the pods are deleted and after `CHURN_CYCLES` more create/Ready/delete cycles of as many pods
//!    (memory kept for reuse stays flat, memory that leaks per pod grows with each cycle).
//! 3. Density (`DENSITY_PODS`, 10,000 by default; 0 skips it): that many WAGI pods bound at
//!    creation (`DENSITY_CONCURRENCY` creates in flight), each on its own port. Printed: the time
//!    from the first create to all Ready, the create -> Ready percentiles, one request to every
//!    pod, the agent's VmRSS and open descriptors before, at rest and after deleting them all,
//!    and, sampled every second throughout, the Lease's age against leaseDurationSeconds and the
//!    Node's Ready condition. Targets: VmRSS < 1 GiB, all Ready within 300 s, every pod answering,
//!    at most one descriptor per pod at rest, no Lease lapse, VmRSS after within 10% of before.
//!
//! Run it through `bench/run node` (builds the agent, the guests and the control plane first), or
//! directly: `target/release/node-bench` from the repo root.
//!
//! Knobs (environment): LATENCY_PODS=30 SCHED_PODS=10 LOAD_PODS=200 HOLD_SECS=60
//! CREATE_CONCURRENCY=8 CHURN_CYCLES=3 NODE_BASE_PORT=21000 (pod ports NODE_BASE_PORT.. upward, each checked free)
//! READY_TIMEOUT_SECS=120 (per pod; 300 s at least for the LOAD_PODS wave) DENSITY_PODS=10000
//! DENSITY_CONCURRENCY=32.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::cluster::Cluster;
use e2e::guests::guest;
use e2e::wasinode::{Wasinode, free_port};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use wasinode_bench::{
    Bench, LABEL, NODE, NS, admin_client, answers_hello, env_usize, fd_kinds, mib, ms, node_ready,
    open_fds, proc_status, rss_split_text, tcp_sockets, wagi_pod, wait_state,
};

/// TCP connections the agent may hold at rest besides its pods' listeners, more than before a
/// wave: its API client's pool (at most 64 requests in flight).
const MAX_SHARED_CONNECTIONS: u64 = 64;

/// A pod nobody runs (a scheduling gate keeps the scheduler off it): the target of the status
/// patch floor.
fn floor_pod() -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bench-floor", "namespace": NS, "labels": {LABEL: "floor"}},
        "spec": {
            "schedulingGates": [{"name": "bench.wasinode.dev/never"}],
            "containers": [{"name": "c", "image": "file:///nonexistent.wasm"}],
        },
    }))?)
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(samples: &[f64]) -> (f64, f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    (
        pct(&s, 0.5),
        pct(&s, 0.9),
        s.first().copied().unwrap_or(f64::NAN),
        s.last().copied().unwrap_or(f64::NAN),
    )
}

fn line(label: &str, samples: &[f64]) -> String {
    let (p50, p90, min, max) = summary(samples);
    format!(
        "  {label:<44} median {p50:8.1} ms   p90 {p90:8.1} ms   min {min:7.1}   max {max:8.1}   (n={})",
        samples.len()
    )
}

async fn lease_renew(leases: &Api<Lease>) -> Result<Option<String>> {
    let lease = leases.get(NODE).await?;
    Ok(lease
        .spec
        .and_then(|s| s.renew_time)
        .map(|t| format!("{:?}", t.0)))
}

/// One status patch of the floor pod by this (admin) client -> the watch seeing it.
async fn probe(b: &mut Bench, i: usize) -> Result<Duration> {
    let msg = format!("probe-{i}");
    let body = json!({"status": {"conditions": [
        {"type": "BenchProbe", "status": "True", "message": msg}
    ]}});
    let t0 = Instant::now();
    b.pods
        .patch_status(
            "bench-floor",
            &PatchParams::default(),
            &Patch::Strategic(&body),
        )
        .await?;
    wait_state(&mut b.rx, &msg, Duration::from_secs(30), |s| {
        s.probes.contains_key(&msg)
    })
    .await?;
    let seen = b.rx.borrow().probes[&msg];
    Ok(seen - t0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let latency_pods = env_usize("LATENCY_PODS", 30);
    let sched_pods = env_usize("SCHED_PODS", 10);
    let load_pods = env_usize("LOAD_PODS", 200);
    let hold = Duration::from_secs(env_usize("HOLD_SECS", 60) as u64);
    let churn_cycles = env_usize("CHURN_CYCLES", 3);
    let concurrency = env_usize("CREATE_CONCURRENCY", 8).max(1);
    let base_port = env_usize("NODE_BASE_PORT", 21000) as u16;
    let ready_timeout = Duration::from_secs(env_usize("READY_TIMEOUT_SECS", 120) as u64);
    let density_pods = env_usize("DENSITY_PODS", 10_000);
    let density_concurrency = env_usize("DENSITY_CONCURRENCY", 32).max(1);

    let hello = guest("hello")?;
    let t = Instant::now();
    let cluster = Cluster::up()?;
    let cluster_up = t.elapsed();
    let kubelet_port = free_port().to_string();
    let bootstrap = cluster.bootstrap_kubeconfig();
    let t_agent = Instant::now();
    // Room for every pod of the load section and the latency pods still around.
    let max_pods = (load_pods.max(density_pods) + latency_pods + sched_pods + 10).to_string();
    // The operator's opt-in to local modules: the bench measures the node, not the registry.
    let guest_dir = hello.parent().context("guest dir")?;
    let agent = Wasinode::start(&[
        "node",
        "--allow-local-images",
        guest_dir.to_str().context("guest dir path")?,
        "--max-pods",
        &max_pods,
        "--port",
        &kubelet_port,
        "--bootstrap-kubeconfig",
        bootstrap.to_str().context("kubeconfig path")?,
        "--node-name",
        NODE,
        "--node-ip",
        "127.0.0.1",
        e2e::agent::EVICTION_HARD_ARG,
    ])?;
    let pid = agent.pid();
    let client = admin_client(&cluster.kubeconfig()).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    // The node joins: bootstrap CSR, Node, Ready.
    let (mut b, watch_task) = Bench::joined(
        cluster,
        agent,
        client.clone(),
        &hello,
        base_port,
        ready_timeout,
    )
    .await?;
    let joined = t_agent.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_joined = proc_status(pid, "VmRSS:").unwrap_or(0);

    println!(
        "4. wasinode node on the local control plane (Kubernetes v1.33.13, etcd 3.4, loopback; the agent, \
         the control plane and this client share the machine's cores)"
    );
    println!(
        "  control plane up in {:.1} s; agent joined (bootstrap CSR -> Node Ready) in {:.2} s; agent VmRSS {:.1} MiB",
        cluster_up.as_secs_f64(),
        joined.as_secs_f64(),
        mib(rss_joined)
    );

    // ---- 4a. bound -> Ready, module cached.
    b.pods.create(&PostParams::default(), &floor_pod()?).await?;
    let (warm, _, _, warm_port) = b.bound_pod("bench-warmup", "warmup").await?;
    if !answers_hello(warm_port) {
        let m = "the warm-up pod is Ready but its route does not answer hello world".to_string();
        b.fail(m);
    }
    println!(
        "  warm-up pod (first use of hello.wasm: read, compile, cache): create -> Ready {:.1} ms",
        ms(warm)
    );
    let (mut ready, mut added, mut rtt, mut probes) = (vec![], vec![], vec![], vec![]);
    let mut bad_routes = 0;
    for i in 0..latency_pods {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (r, a, c, port) = b.bound_pod(&format!("bench-bound-{i}"), "bound").await?;
        ready.push(ms(r));
        added.push(ms(a));
        rtt.push(ms(c));
        if !answers_hello(port) {
            bad_routes += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        probes.push(ms(probe(&mut b, i).await?));
    }
    let (r50, ..) = summary(&ready);
    let (a50, ..) = summary(&added);
    let (p50, ..) = summary(&probes);
    println!(
        "  bound -> Ready: {latency_pods} WAGI pods created one at a time with spec.nodeName set, hello.wasm cached"
    );
    println!("{}", line("create sent -> watch sees Ready=True", &ready));
    println!("{}", line("floor: create sent -> watch sees ADDED", &added));
    println!(
        "{}",
        line("floor: status patch sent -> watch sees it", &probes)
    );
    println!("{}", line("(create request round-trip)", &rtt));
    println!(
        "  median Ready / median ADDED: {:.1}x;  median Ready / (ADDED + status patch) floor: {:.1}x;  \
         agent's own share ~ {:.1} ms",
        r50 / a50,
        r50 / (a50 + p50),
        r50 - a50 - p50
    );
    println!(
        "  target median < 200 ms: {}",
        if r50 < 200.0 { "MET" } else { "MISSED" }
    );
    if bad_routes > 0 {
        b.fail(format!(
            "{bad_routes} of {latency_pods} Ready pods did not answer hello world"
        ));
    }

    // ---- 4b. through kube-scheduler.
    let (mut s_sched, mut s_ready) = (vec![], vec![]);
    for i in 0..sched_pods {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let name = format!("bench-sched-{i}");
        let port = b.ports.free()?;
        let pod = wagi_pod(&name, "sched", port, &b.image, None)?;
        let t0 = Instant::now();
        b.pods.create(&PostParams::default(), &pod).await?;
        let ready_at = b.wait_ready(&name, ready_timeout).await?;
        let scheduled = b.rx.borrow().pods[&name]
            .scheduled
            .expect("scheduled before ready");
        s_sched.push(ms(scheduled - t0));
        s_ready.push(ms(ready_at - t0));
        if !answers_hello(port) {
            b.fail(format!("{name} is Ready but does not answer hello world"));
        }
    }
    println!(
        "  through kube-scheduler: {sched_pods} pods without nodeName (nodeSelector + tolerations)"
    );
    println!("{}", line("create sent -> watch sees nodeName", &s_sched));
    println!("{}", line("create sent -> watch sees Ready=True", &s_ready));

    let (n, took) = b
        .delete_groups(&["warmup", "bound", "sched", "floor"])
        .await?;
    println!(
        "  deleting those {n} pods (delete collection -> watch sees every one gone): {:.2} s",
        took.as_secs_f64()
    );
    println!();

    // ---- 5. LOAD_PODS pods on the node.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_zero = proc_status(pid, "VmRSS:").unwrap_or(0);
    println!(
        "5. {load_pods} WAGI pods on one node (bound at creation, {concurrency} creates in flight, distinct ports)"
    );
    let capacity = nodes
        .get(NODE)
        .await?
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get("pods").map(|q| q.0.clone()))
        .unwrap_or_default();
    println!("  the Node advertises allocatable pods {capacity} (--max-pods {max_pods})");
    let (ports, specs) = b.port_pods("bench-load", "load", load_pods, NODE)?;
    let t0 = Instant::now();
    let created = create_all(&b.pods, specs, concurrency).await?;
    let all_created = t0.elapsed();
    let names: Vec<String> = created.iter().map(|(n, _)| n.clone()).collect();
    let wave_timeout = ready_timeout.max(Duration::from_secs(300));
    if let Err(e) = wait_state(&mut b.rx, "every load pod to be Ready", wave_timeout, |s| {
        names
            .iter()
            .all(|n| s.pods.get(n).is_some_and(|p| p.ready.is_some()))
    })
    .await
    {
        let st = b.rx.borrow();
        let missing: Vec<String> = names
            .iter()
            .filter(|n| st.pods.get(*n).is_none_or(|p| p.ready.is_none()))
            .cloned()
            .collect();
        drop(st);
        let first = missing.first().cloned().unwrap_or_default();
        bail!(
            "{e:#}: {} not Ready ({:?}...)\n{}\n--- agent output (tail)\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            b.pod_dump(&first),
            b.agent_tail()
        );
    }
    let all_ready_at = names
        .iter()
        .filter_map(|n| b.rx.borrow().pods[n].ready)
        .max()
        .expect("pods");
    let per_pod: Vec<f64> = {
        let st = b.rx.borrow();
        created
            .iter()
            .map(|(n, sent)| ms(st.pods[n].ready.expect("ready") - *sent))
            .collect()
    };
    println!(
        "  all {load_pods} created in {:.2} s; all Ready {:.2} s after the first create",
        all_created.as_secs_f64(),
        (all_ready_at - t0).as_secs_f64()
    );
    println!(
        "{}",
        line("each pod: create sent -> watch sees Ready", &per_pod)
    );
    let sample: Vec<u16> = ports.iter().step_by(10).copied().collect();
    let ok = sample.iter().filter(|p| answers_hello(**p)).count();
    println!(
        "  sample of routes (every 10th pod): {ok}/{} answered hello world",
        sample.len()
    );
    if ok != sample.len() {
        b.fail(format!(
            "{} of {} sampled routes did not answer",
            sample.len() - ok,
            sample.len()
        ));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_rest = proc_status(pid, "VmRSS:").unwrap_or(0);
    let threads = proc_status(pid, "Threads:").unwrap_or(0);

    // Hold: a round-robin HTTP client on every route; the Node and Lease checked every 5 s; VmRSS
    // sampled every second.
    let stop = Arc::new(AtomicBool::new(false));
    let (reqs_ok, reqs_bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, bad, ports) = (
            stop.clone(),
            reqs_ok.clone(),
            reqs_bad.clone(),
            ports.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if answers_hello(ports[i % ports.len()]) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    let hold_start = Instant::now();
    let (mut rss_peak, mut rss_samples) = (rss_rest, vec![]);
    let (mut checks, mut ready_checks, mut renewals) = (0, 0, 0);
    let mut last_renew = lease_renew(&leases).await.ok().flatten();
    let mut tick = 0u64;
    while hold_start.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        let rss = proc_status(pid, "VmRSS:").unwrap_or(0);
        rss_peak = rss_peak.max(rss);
        rss_samples.push(rss);
        if tick.is_multiple_of(5) {
            checks += 1;
            if node_ready(&nodes).await.unwrap_or(false) {
                ready_checks += 1;
            }
            let renew = lease_renew(&leases).await.ok().flatten();
            if renew.is_some() && renew != last_renew {
                renewals += 1;
                last_renew = renew;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.await?;
    let held = hold_start.elapsed();
    let hwm = proc_status(pid, "VmHWM:").unwrap_or(0);
    let (ok, bad) = (
        reqs_ok.load(Ordering::Relaxed),
        reqs_bad.load(Ordering::Relaxed),
    );
    let lost: u32 = names.iter().map(|n| b.rx.borrow().pods[n].lost_ready).sum();
    let rss_end = proc_status(pid, "VmRSS:").unwrap_or(0);
    println!(
        "  held {:.0} s under a round-robin HTTP client over all {load_pods} routes: {ok} requests answered hello world, {bad} did not ({:.0} req/s)",
        held.as_secs_f64(),
        ok as f64 / held.as_secs_f64()
    );
    println!(
        "  Node Ready at {ready_checks}/{checks} checks (every 5 s); Lease renewed {renewals} times; \
         load pods seen leaving Ready: {lost}"
    );
    println!(
        "  agent VmRSS: joined, no pod yet {:.1} MiB; 0 pods after the first section {:.1} MiB; \
         {load_pods} pods at rest {:.1} MiB; peak under load {:.1} MiB (VmHWM {:.1} MiB); end {:.1} MiB; {threads} threads",
        mib(rss_joined),
        mib(rss_zero),
        mib(rss_rest),
        mib(rss_peak),
        mib(hwm),
        mib(rss_end)
    );
    println!(
        "  per pod: {:.1} KiB at rest ((at rest - 0 pods) / {load_pods}); target < 300 MiB resident: {}",
        (rss_rest as f64 - rss_zero as f64) / load_pods.max(1) as f64,
        if mib(rss_peak.max(hwm)) < 300.0 {
            "MET"
        } else {
            "MISSED"
        }
    );
    if ready_checks != checks {
        b.fail(format!(
            "the Node was not Ready at {} of {checks} checks",
            checks - ready_checks
        ));
    }
    if bad > 0 {
        b.fail(format!(
            "{bad} requests during the hold did not answer hello world"
        ));
    }
    if lost > 0 {
        b.fail(format!("load pods left Ready {lost} times during the run"));
    }

    let (n, took) = b.delete_groups(&["load"]).await?;
    println!(
        "  deleting the {n} pods (delete collection -> watch sees every one gone): {:.2} s",
        took.as_secs_f64()
    );
    let freed = ports
        .iter()
        .filter(|p| TcpListener::bind(("127.0.0.1", **p)).is_ok())
        .count();
    println!("  ports free again after deletion: {freed}/{}", ports.len());
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "  agent VmRSS 5 s after deleting them: {:.1} MiB",
        mib(proc_status(pid, "VmRSS:").unwrap_or(0))
    );
    // Churn: the same number of pods created and deleted again, to tell memory the allocator
    // keeps for reuse from memory that grows with every pod ever run.
    let mut after = vec![];
    for c in 1..=churn_cycles {
        let took = b.churn(&format!("churn{c}"), &ports, concurrency).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = proc_status(pid, "VmRSS:").unwrap_or(0);
        after.push(format!("{:.1} MiB ({:.1} s)", mib(rss), took.as_secs_f64()));
    }
    if churn_cycles > 0 {
        println!(
            "  churn: {churn_cycles} more cycles of {load_pods} pods created, Ready, deleted; agent VmRSS 5 s after each \
             (cycle time): {}",
            after.join(", ")
        );
    }
    if freed != ports.len() {
        b.fail(format!(
            "{} ports still taken after deletion",
            ports.len() - freed
        ));
    }

    if density_pods > 0 {
        density(
            &mut b,
            pid,
            density_pods,
            density_concurrency,
            &leases,
            &nodes,
        )
        .await?;
    }

    println!(
        "  load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    watch_task.abort();
    b.agent.signal("TERM")?;
    let _ = b.agent.wait_exit(Duration::from_secs(30));
    let Bench {
        cluster, failures, ..
    } = b;
    cluster.down()?;
    if !failures.is_empty() {
        bail!("functional failures: {}", failures.join("; "));
    }
    Ok(())
}

/// Creates `specs`, `concurrency` at a time: each pod's name and the instant its create was sent.
async fn create_all(
    pods: &Api<Pod>,
    specs: Vec<Pod>,
    concurrency: usize,
) -> Result<Vec<(String, Instant)>> {
    let created: Vec<Result<(String, Instant)>> = futures::stream::iter(specs)
        .map(|pod| {
            let api = pods.clone();
            async move {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let sent = Instant::now();
                api.create(&PostParams::default(), &pod).await?;
                Ok((name, sent))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    created.into_iter().collect()
}

/// What the density section's monitor saw while the pods started and ran.
#[derive(Default)]
struct Watchdog {
    samples: u64,
    /// The oldest the Lease's renewTime was at any sample, in seconds.
    max_lease_age: f64,
    lease_duration: f64,
    /// Samples at which the Lease had lapsed (renewTime older than leaseDurationSeconds).
    lapses: u64,
    not_ready: u64,
    rss_peak: u64,
    fds_peak: u64,
}

/// Every second until `stop`: the Lease's age against its duration, the Node's Ready condition,
/// the agent's VmRSS and open descriptors.
fn spawn_watchdog(
    pid: u32,
    leases: Api<Lease>,
    nodes: Api<Node>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Watchdog> {
    tokio::spawn(async move {
        let mut w = Watchdog::default();
        while !stop.load(Ordering::Relaxed) {
            w.samples += 1;
            w.rss_peak = w.rss_peak.max(proc_status(pid, "VmRSS:").unwrap_or(0));
            w.fds_peak = w.fds_peak.max(open_fds(pid));
            if let Ok(lease) = leases.get(NODE).await
                && let Some(spec) = lease.spec
            {
                let duration = f64::from(spec.lease_duration_seconds.unwrap_or(40));
                w.lease_duration = duration;
                if let Some(renewed) = spec.renew_time {
                    let age = k8s_openapi::jiff::Timestamp::now()
                        .duration_since(renewed.0)
                        .as_secs_f64();
                    w.max_lease_age = w.max_lease_age.max(age);
                    if age > duration {
                        w.lapses += 1;
                    }
                }
            }
            if !node_ready(&nodes).await.unwrap_or(false) {
                w.not_ready += 1;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        w
    })
}

/// Until `count` (over the watched state) reaches `want`, polled every 250 ms (a predicate over
/// ten thousand names on every watch event would cost this client more than the agent).
async fn wait_count(
    b: &Bench,
    what: &str,
    want: usize,
    timeout: Duration,
    count: impl Fn(&wasinode_bench::State) -> usize,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = count(&b.rx.borrow());
        if n >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {n} of {want}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Section 6, density: `n` WAGI pods bound at creation, each on its own port; Ready latency, the
/// agent's memory and descriptors, every route answering, the Lease throughout, then all deleted.
async fn density(
    b: &mut Bench,
    pid: u32,
    n: usize,
    concurrency: usize,
    leases: &Api<Lease>,
    nodes: &Api<Node>,
) -> Result<()> {
    println!();
    println!(
        "6. density: {n} WAGI pods on one node (bound at creation with spec.nodeName, {concurrency} creates in flight, one port each)"
    );
    // The level before: the agent at rest after the earlier sections' pods are gone.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_before = proc_status(pid, "VmRSS:").unwrap_or(0);
    let fds_before = open_fds(pid);
    let (_, conns_before) = tcp_sockets(pid);
    let data_dir = b.agent.data_dir.clone();
    let limit = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" soft / ")
                        + " hard"
                })
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "  before: agent VmRSS {:.1} MiB ({}), {fds_before} open descriptors (limit: {limit})",
        mib(rss_before),
        rss_split_text(pid)
    );
    let (ports, specs) = b.port_pods("bench-density", "density", n, NODE)?;
    let names: Vec<String> = (0..n).map(|i| format!("bench-density-{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = spawn_watchdog(pid, leases.clone(), nodes.clone(), stop.clone());

    let t0 = Instant::now();
    let created = create_all(&b.pods, specs, concurrency).await?;
    let all_created = t0.elapsed();
    let ready_count = |s: &wasinode_bench::State| {
        names
            .iter()
            .filter(|n| s.pods.get(*n).is_some_and(|p| p.ready.is_some()))
            .count()
    };
    if let Err(e) = wait_count(
        b,
        "every density pod to be Ready",
        n,
        Duration::from_secs(600),
        ready_count,
    )
    .await
    {
        stop.store(true, Ordering::Relaxed);
        bail!("{e:#}\n--- agent output (tail)\n{}", b.agent_tail());
    }
    let (all_ready, per_pod) = {
        let st = b.rx.borrow();
        let last = names
            .iter()
            .filter_map(|n| st.pods[n].ready)
            .max()
            .expect("pods");
        let per_pod: Vec<f64> = created
            .iter()
            .map(|(n, sent)| ms(st.pods[n].ready.expect("ready") - *sent))
            .collect();
        (last - t0, per_pod)
    };
    println!(
        "  all {n} created in {:.1} s; all Ready {:.1} s after the first create (target <= 300 s: {})",
        all_created.as_secs_f64(),
        all_ready.as_secs_f64(),
        if all_ready <= Duration::from_secs(300) {
            "MET"
        } else {
            "MISSED"
        }
    );
    let mut sorted = per_pod.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "  each pod, create sent -> watch sees Ready: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(&sorted, 0.50),
        pct(&sorted, 0.90),
        pct(&sorted, 0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    );

    // Every route answers: one request each, from four threads.
    let t_answer = Instant::now();
    let answered = {
        let ports = Arc::new(ports.clone());
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (ports, next) = (ports.clone(), next.clone());
                std::thread::spawn(move || {
                    let mut ok = 0usize;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(port) = ports.get(i) else { break ok };
                        if answers_hello(*port) {
                            ok += 1;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(0))
            .sum::<usize>()
    };
    println!(
        "  every route asked once: {answered}/{n} answered hello world ({:.1} s)",
        t_answer.elapsed().as_secs_f64()
    );
    if answered != n {
        b.fail(format!(
            "{} of {n} density pods did not answer",
            n - answered
        ));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_rest = proc_status(pid, "VmRSS:").unwrap_or(0);
    let fds_rest = open_fds(pid);
    let (listeners_rest, conns_rest) = tcp_sockets(pid);
    let threads = proc_status(pid, "Threads:").unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let w = watchdog.await?;
    println!(
        "  at rest with {n} pods: agent VmRSS {:.1} MiB ({:.1} KiB per pod), peak {:.1} MiB (target < 1024 MiB: {}); {threads} threads",
        mib(rss_rest),
        (rss_rest as f64 - rss_before as f64) / n as f64,
        mib(w.rss_peak.max(rss_rest)),
        if mib(w.rss_peak.max(rss_rest)) < 1024.0 {
            "MET"
        } else {
            "MISSED"
        }
    );
    // What a pod holds at rest: every descriptor beyond the level before, less the connections
    // (the API client's pool, at most 64 requests in flight, and clients of the node's servers),
    // which do not grow with the pods; a count of connections that did grow with them fails.
    let conns = conns_rest.saturating_sub(conns_before);
    let per_pod_fds = (fds_rest as f64 - fds_before as f64 - conns as f64) / n as f64;
    let per_pod_ok = per_pod_fds <= 1.0 && conns <= MAX_SHARED_CONNECTIONS;
    println!(
        "  open descriptors: {fds_rest} at rest, {listeners_rest} of them listening sockets and {conns_rest} other TCP sockets ({conns_before} before); {per_pod_fds:.3} per pod besides connections (target <= 1, connections <= {MAX_SHARED_CONNECTIONS} more than before: {}), peak {}: {}",
        if per_pod_ok { "MET" } else { "MISSED" },
        w.fds_peak.max(fds_rest),
        fd_kinds(pid, &data_dir)
    );
    println!(
        "  Lease (leaseDurationSeconds {:.0}): oldest renewTime seen {:.1} s, lapsed at {} of {} samples (every second); Node not Ready at {} samples",
        w.lease_duration, w.max_lease_age, w.lapses, w.samples, w.not_ready
    );
    if w.lapses > 0 {
        b.fail(format!("the Lease lapsed at {} samples", w.lapses));
    }
    if w.not_ready > 0 {
        b.fail(format!("the Node was not Ready at {} samples", w.not_ready));
    }

    let t_del = Instant::now();
    // Deleting by label is idempotent: a request that fails to send (a pooled connection the API
    // server closed while it was busy) is sent again.
    let selector = format!("{}=density", wasinode_bench::LABEL);
    let mut attempt = 0;
    while let Err(e) = b
        .pods
        .delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default().labels(&selector),
        )
        .await
    {
        attempt += 1;
        if attempt >= 5 {
            return Err(e).context("deleting the density pods");
        }
        eprintln!("bench: deleting the density pods: {e}; again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_count(
        b,
        "every density pod to be deleted",
        n,
        Duration::from_secs(600),
        |s| {
            names
                .iter()
                .filter(|n| s.pods.get(*n).is_some_and(|p| p.deleted.is_some()))
                .count()
        },
    )
    .await
    .with_context(|| b.agent_tail())?;
    println!(
        "  deleting them all (delete collection -> watch sees every one gone): {:.1} s",
        t_del.elapsed().as_secs_f64()
    );
    // The agent has let go once every port is free again.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut taken;
    loop {
        taken = ports
            .iter()
            .filter(|p| TcpListener::bind(("127.0.0.1", **p)).is_err())
            .count();
        if taken == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if taken > 0 {
        b.fail(format!(
            "{taken} density ports still taken 120 s after deletion"
        ));
    }
    let gone = Instant::now();
    let mut after = vec![];
    let mut rss_after = 0;
    // Freed memory goes back to the system over a while (the allocator's purge delay, the API
    // client's idle connections): samples up to 2 minutes, the target taken on the last.
    for secs in [5u64, 30, 60, 120] {
        let since = gone.elapsed();
        if let Some(wait) = Duration::from_secs(secs).checked_sub(since) {
            tokio::time::sleep(wait).await;
        }
        rss_after = proc_status(pid, "VmRSS:").unwrap_or(0);
        after.push(format!("{:.1} MiB {secs} s after", mib(rss_after)));
    }
    let ratio = rss_after as f64 / rss_before.max(1) as f64;
    println!("  where it is 120 s after: {}", rss_split_text(pid));
    println!(
        "  after deleting them: agent VmRSS {} ({:.2}x the level before; target within 10%: {}); {} open descriptors ({})",
        after.join(", "),
        ratio,
        if ratio <= 1.10 { "MET" } else { "MISSED" },
        open_fds(pid),
        fd_kinds(pid, &data_dir)
    );
    Ok(())
}
