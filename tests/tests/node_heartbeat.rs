//! `wasinode node`'s heartbeat when some API calls hang, on a real control plane: the agent talks
//! to kube-apiserver through a [`StallProxy`], which stalls (holds, forwards nothing) every
//! connection open at a moment, again every 12 s, for longer than the Lease lasts: whatever
//! kept-alive connection a call picks from the agent's pool hangs, and only connections opened
//! since the last stall go through. All the while, as `kubectl` shows, the Node's Lease keeps
//! being renewed (its `renewTime` advances at least every 20 s, never near the 40 s after which
//! it lapses) and the Node stays Ready (the test cluster's node controller marks it Unknown 20 s
//! after the last renewal it saw).
//!
//! Run: `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test node_heartbeat`

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, node_ready};
use e2e::cluster::Cluster;
use e2e::stallproxy::StallProxy;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(90);
/// How long connections are stalled: longer than the Lease (40 s).
const STALL: Duration = Duration::from_secs(75);
/// How often the open connections are stalled again.
const RESTALL: Duration = Duration::from_secs(12);
/// The longest the Lease may go without being renewed (it is renewed every 10 s).
const MAX_GAP: Duration = Duration::from_secs(20);

/// Points the kubeconfig at `server` (its one cluster), keeping everything else.
fn point_kubeconfig_at(path: &Path, server: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut kc: Value = serde_json::from_str(&text).context("the node's kubeconfig")?;
    let clusters = kc["clusters"]
        .as_array_mut()
        .context("no clusters in the node's kubeconfig")?;
    ensure!(clusters.len() == 1, "clusters: {clusters:?}");
    clusters[0]["cluster"]["server"] = Value::from(server);
    std::fs::write(path, serde_json::to_vec_pretty(&kc)?)?;
    Ok(())
}

#[test]
fn the_lease_is_renewed_while_api_calls_hang() -> Result<()> {
    const NODE: &str = "heartbeat-node";
    let cluster = Cluster::up()?;
    let mut agent = Agent::start_ready(&cluster, AgentOptions::new(NODE), TIMEOUT)?;

    // The same agent again, now through the proxy. The API server's certificate names
    // 127.0.0.1, so it verifies on the proxy's port too.
    let upstream: SocketAddr = cluster
        .api_server
        .strip_prefix("https://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("API server address {}", cluster.api_server))?;
    let proxy = StallProxy::start(upstream)?;
    agent.kill()?;
    point_kubeconfig_at(
        &agent.kubeconfig(),
        &format!("https://127.0.0.1:{}", proxy.addr().port()),
    )?;
    let before = cluster.lease_renew_time(NODE)?;
    agent.restart()?;
    cluster
        .wait_for("the Lease renewed through the proxy", TIMEOUT, || {
            Ok(proxy.stats().accepted > 0 && cluster.lease_renew_time(NODE)? > before)
        })
        .with_context(|| agent.output())?;
    agent.wait_ready(&cluster, TIMEOUT)?;

    // Right after a renewal, so that the connection it went on waits in the agent's pool for
    // the next one.
    let last = cluster.lease_renew_time(NODE)?;
    cluster
        .wait_for("the next Lease renewal", TIMEOUT, || {
            Ok(cluster.lease_renew_time(NODE)? > last)
        })
        .with_context(|| agent.output())?;
    let started = Instant::now();
    let mut last_stall = Instant::now();
    let stalled = proxy.stall();
    eprintln!("heartbeat: stalled {stalled} open connections");
    let mut last = cluster.lease_renew_time(NODE)?;
    let mut last_change = Instant::now();
    let mut renewals = 0;
    let mut longest = Duration::ZERO;
    while started.elapsed() < STALL {
        if last_stall.elapsed() >= RESTALL {
            last_stall = Instant::now();
            let stalled = proxy.stall();
            eprintln!(
                "heartbeat: at {:?} stalled {stalled} more open connections",
                started.elapsed()
            );
        }
        ensure!(
            agent.running(),
            "the agent exited while calls hung:\n{}",
            agent.output()
        );
        let now = cluster.lease_renew_time(NODE)?;
        if now > last {
            longest = longest.max(last_change.elapsed());
            last = now;
            last_change = Instant::now();
            renewals += 1;
        }
        let gap = last_change.elapsed();
        ensure!(
            gap <= MAX_GAP,
            "the Lease was not renewed for {gap:?} (last renewTime {last}, {renewals} renewals \
             in {:?} of stalled connections; proxy {:?}):\n{}",
            started.elapsed(),
            proxy.stats(),
            agent.output()
        );
        ensure!(
            node_ready(&cluster, NODE)?,
            "the Node is not Ready after {:?} of stalled connections ({renewals} renewals, \
             last {last}); conditions {}:\n{}",
            started.elapsed(),
            cluster.kubectl_json(&["get", "node", NODE])?["status"]["conditions"],
            agent.output()
        );
        // The poll interval (not a wait for anything).
        std::thread::sleep(Duration::from_millis(500));
    }
    let stats = proxy.stats();
    eprintln!(
        "heartbeat: {renewals} renewals in {STALL:?}, longest gap seen {longest:?}; proxy {stats:?}"
    );
    ensure!(
        stats.held > 0,
        "no call of the agent hung on a stalled connection: {stats:?}"
    );
    ensure!(renewals >= 3, "{renewals} renewals in {STALL:?}");

    proxy.release();
    let last = cluster.lease_renew_time(NODE)?;
    cluster
        .wait_for("a Lease renewal after the stall", TIMEOUT, || {
            Ok(cluster.lease_renew_time(NODE)? > last)
        })
        .with_context(|| agent.output())?;
    ensure!(node_ready(&cluster, NODE)?, "the Node is not Ready");
    drop(agent);
    drop(proxy);
    cluster.down()
}
