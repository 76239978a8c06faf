//! `resources` on a wasinode node, on the real control plane, as a pod author and a cluster
//! user see them:
//! - `limits.memory` caps each instance of that container: a request that needs more fails alone
//!   (500, the reason in `kubectl logs`, a Warning Event), the next request is served; a limit
//!   above the node's `--max-memory` gets the node's maximum, and an Event says so;
//! - `limits.cpu` bounds the CPU the container's instances take: the same load does much less
//!   work, and costs the agent much less CPU, under a tenth of a core than with no limit;
//! - requests count against the Node's allocatable: kube-scheduler keeps a pod that does not fit
//!   Pending (`Insufficient cpu`), and a pod bound to the node directly beyond what is left is
//!   Failed `OutOfcpu` / `OutOfmemory` with the kubelet's message and Event, while the first pod
//!   keeps serving.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_limits`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, hello_pod, wagi_pod};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get, listening};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A WAGI pod whose one container serves `route` from `image`, with `resources`.
fn pod_with(name: &str, addr: &str, route: &str, image: &str, resources: Value) -> Value {
    let modules = format!(r#"{{"hello": {{"route": "{route}"}}}}"#);
    let mut pod = wagi_pod(name, addr, &modules, image, true);
    pod["spec"]["containers"][0]["resources"] = resources;
    pod
}

fn answer(addr: &str, path: &str) -> Result<(u16, String)> {
    let r = get(addr, path)?;
    Ok((r.status, r.body))
}

#[test]
fn a_memory_limit_fails_the_request_over_it_alone() -> Result<()> {
    let registry = Registry::start();
    let alloc = registry.push_guest("alloc")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-mem"), TIMEOUT)?;

    let capped = format!("127.0.0.1:{}", free_port());
    cluster.apply(&pod_with(
        "capped",
        &capped,
        "/alloc",
        &alloc,
        json!({"limits": {"memory": "16Mi"}}),
    ))?;
    // Above the node's --max-memory (128MiB by default): instances get the node's maximum.
    let roomy = format!("127.0.0.1:{}", free_port());
    cluster.apply(&pod_with(
        "roomy",
        &roomy,
        "/alloc",
        &alloc,
        json!({"limits": {"memory": "1Gi"}}),
    ))?;
    cluster
        .wait_pod_running("capped", TIMEOUT)
        .with_context(|| agent.output())?;
    cluster
        .wait_pod_running("roomy", TIMEOUT)
        .with_context(|| agent.output())?;

    ensure!(answer(&capped, "/alloc?4")? == (200, "allocated 4 MiB\n".into()));
    let (status, body) = answer(&capped, "/alloc?40")?;
    ensure!(status == 500, "40 MiB under a 16Mi limit: {status} {body}");
    ensure!(
        answer(&capped, "/alloc?4")? == (200, "allocated 4 MiB\n".into()),
        "the pod serves on after a request over its limit"
    );
    // The same request in the pod whose limit is above the node's maximum fits; one over the
    // node's maximum does not.
    ensure!(answer(&roomy, "/alloc?40")? == (200, "allocated 40 MiB\n".into()));
    ensure!(
        answer(&roomy, "/alloc?200")?.0 == 500,
        "the node's --max-memory still applies"
    );

    let limit = (16u64 << 20).to_string();
    cluster.wait_for("the capped pod's log says why", TIMEOUT, || {
        let log = cluster.kubectl(&["logs", "capped"])?;
        Ok(log.contains(&format!("more than {limit} bytes of memory")) && log.contains("/alloc"))
    })?;
    cluster.wait_pod_event(
        "capped",
        "Warning",
        "MemoryLimitExceeded",
        &["container hello", &limit, "/alloc"],
        TIMEOUT,
    )?;
    cluster.wait_pod_event(
        "roomy",
        "Warning",
        "MemoryLimitAboveNodeMaximum",
        &[
            "container hello",
            "--max-memory",
            &(128u64 << 20).to_string(),
        ],
        TIMEOUT,
    )?;
    Ok(())
}

/// The agent's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses): utime is the 14th field of the
    // line, stime the 15th; clock ticks of 1/100 s on Linux.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// Two clients each sending `rounds` requests of `/spin?250` to `addr` at once; returns the work
/// the guests did (their rounds, summed), the agent's CPU time meanwhile, and the wall time.
fn load(pid: u32, addr: &str, requests: usize) -> Result<(u64, Duration, Duration)> {
    let cpu0 = cpu_time(pid)?;
    let t0 = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.to_string();
            std::thread::spawn(move || -> Result<u64> {
                let mut work = 0;
                for _ in 0..requests {
                    let (status, body) = answer(&addr, "/spin?250")?;
                    ensure!(status == 200, "GET /spin: {status} {body}");
                    work += body
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .context("no rounds in the answer")?;
                }
                Ok(work)
            })
        })
        .collect();
    let mut work = 0;
    for c in clients {
        work += c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok((work, cpu_time(pid)? - cpu0, t0.elapsed()))
}

#[test]
fn a_cpu_limit_bounds_the_share_of_the_node_a_container_takes() -> Result<()> {
    let registry = Registry::start();
    let spin = registry.push_guest("spin")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-cpu"), TIMEOUT)?;
    let pid = agent.pid().context("agent pid")?;

    let free = format!("127.0.0.1:{}", free_port());
    cluster.apply(&pod_with("free", &free, "/spin", &spin, json!({})))?;
    let tenth = format!("127.0.0.1:{}", free_port());
    cluster.apply(&pod_with(
        "tenth",
        &tenth,
        "/spin",
        &spin,
        json!({"limits": {"cpu": "100m"}}),
    ))?;
    cluster
        .wait_pod_running("free", TIMEOUT)
        .with_context(|| agent.output())?;
    cluster
        .wait_pod_running("tenth", TIMEOUT)
        .with_context(|| agent.output())?;

    let (free_work, free_cpu, free_wall) = load(pid, &free, 6)?;
    let (tenth_work, tenth_cpu, tenth_wall) = load(pid, &tenth, 6)?;
    let share = |cpu: Duration, wall: Duration| cpu.as_secs_f64() / wall.as_secs_f64();
    let (free_share, tenth_share) = (share(free_cpu, free_wall), share(tenth_cpu, tenth_wall));
    eprintln!(
        "no limit: {free_work} rounds, {free_share:.2} cores; limits.cpu 100m: {tenth_work} rounds, {tenth_share:.2} cores"
    );
    // Two instances spinning take up to two cores without a limit; with 100m they get a tenth of
    // one, plus at most one epoch tick (10 ms) each per 100 ms period before they are held.
    ensure!(
        tenth_share < 0.4,
        "under limits.cpu 100m the container took {tenth_share:.2} cores"
    );
    ensure!(
        (tenth_work as f64) < free_work as f64 * 0.5,
        "the limit must cut the work done in the same time: {tenth_work} vs {free_work} rounds"
    );
    Ok(())
}

/// `cpu` and `memory` of the Node's allocatable, in millicores and bytes.
fn allocatable(cluster: &Cluster, node: &str) -> Result<(u64, u64)> {
    let n = cluster.kubectl_json(&["get", "node", node])?;
    let a = &n["status"]["allocatable"];
    let cpu = a["cpu"].as_str().context("allocatable cpu")?;
    let cpu: u64 = match cpu.strip_suffix('m') {
        Some(m) => m.parse()?,
        None => cpu.parse::<u64>()? * 1000,
    };
    let mem = a["memory"].as_str().context("allocatable memory")?;
    let mem: u64 = mem
        .strip_suffix("Ki")
        .context("memory in Ki")?
        .parse::<u64>()?
        * 1024;
    Ok((cpu, mem))
}

#[test]
fn requests_count_against_allocatable_as_the_scheduler_and_the_kubelet_count_them() -> Result<()> {
    let registry = Registry::start();
    let hello = registry.push_guest("hello")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-fit"), TIMEOUT)?;
    let (cpu, memory) = allocatable(&cluster, "wasi-fit")?;
    let most = cpu * 6 / 10;
    let with_requests = |name: &str, addr: &str, requests: Value| {
        let mut p = hello_pod(name, addr, &hello);
        p["spec"]["containers"][0]["resources"] = json!({ "requests": requests });
        p
    };

    // Scheduled by kube-scheduler: it fits.
    let first = format!("127.0.0.1:{}", free_port());
    cluster.apply(&with_requests(
        "first",
        &first,
        json!({"cpu": format!("{most}m")}),
    ))?;
    cluster
        .wait_pod_running("first", TIMEOUT)
        .with_context(|| agent.output())?;

    // The scheduler sees what is left and keeps the same request Pending.
    let pending = format!("127.0.0.1:{}", free_port());
    cluster.apply(&with_requests(
        "pending",
        &pending,
        json!({"cpu": format!("{most}m")}),
    ))?;
    cluster.wait_pod_event(
        "pending",
        "Warning",
        "FailedScheduling",
        &["Insufficient cpu"],
        TIMEOUT,
    )?;
    ensure!(cluster.pod("pending")?["spec"]["nodeName"].is_null());

    // Bound to the node directly, past the scheduler: the node's admission refuses it.
    let bound = format!("127.0.0.1:{}", free_port());
    let mut pod = with_requests("bound", &bound, json!({"cpu": format!("{most}m")}));
    pod["spec"]["nodeName"] = json!("wasi-fit");
    cluster.apply(&pod)?;
    cluster
        .wait_for("bound Failed with OutOfcpu", TIMEOUT, || {
            let p = cluster.pod("bound")?;
            Ok(p["status"]["phase"] == "Failed" && p["status"]["reason"] == "OutOfcpu")
        })
        .with_context(|| agent.output())?;
    let p = cluster.pod("bound")?;
    let message = p["status"]["message"].as_str().unwrap_or_default();
    let expected = format!("cpu, requested: {most}, used: {most}, capacity: {cpu}");
    ensure!(message.contains(&expected), "{message}: want {expected}");
    cluster.wait_pod_event("bound", "Warning", "OutOfcpu", &[&expected], TIMEOUT)?;
    ensure!(!listening(&bound), "a rejected pod listens on {bound}");

    // Memory likewise: more than the node has for pods.
    let huge = format!("127.0.0.1:{}", free_port());
    let mut pod = with_requests(
        "huge",
        &huge,
        json!({"memory": (memory + (1 << 20)).to_string()}),
    );
    pod["spec"]["nodeName"] = json!("wasi-fit");
    cluster.apply(&pod)?;
    cluster
        .wait_for("huge Failed with OutOfmemory", TIMEOUT, || {
            let p = cluster.pod("huge")?;
            Ok(p["status"]["phase"] == "Failed" && p["status"]["reason"] == "OutOfmemory")
        })
        .with_context(|| agent.output())?;
    cluster.wait_pod_event(
        "huge",
        "Warning",
        "OutOfmemory",
        &["memory, requested"],
        TIMEOUT,
    )?;

    ensure!(answer(&first, "/hello")? == (200, "hello world\n".into()));
    // Room again once the first pod is gone: the scheduler places the pending pod.
    cluster.kubectl(&["delete", "pod", "first", "--wait=true", "--timeout=60s"])?;
    cluster
        .wait_pod_running("pending", TIMEOUT)
        .with_context(|| agent.output())?;
    ensure!(answer(&pending, "/hello")? == (200, "hello world\n".into()));
    Ok(())
}
