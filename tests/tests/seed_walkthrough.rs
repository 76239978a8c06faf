//! The seed's walk-through (`wasi-node-pools.md`) end to end on the local control plane:
//! - the five krustlet-wagi-demo modules are pushed with `wasinode push` to a local registry;
//! - `wasinode node --pool mywasipool` joins by bootstrap token as `aks-mywasipool-000000` and
//!   `kubectl describe node` shows the seed's `agentpool` label and `wasm32-wagi` taints;
//! - the seed's `wasi-example.yaml` pod (images on the local registry, another default-host port)
//!   is scheduled there and shows Running with READY 5/5;
//! - nginx configured as the seed's values.yaml `serverBlock` proxies `GET /hello` to
//!   `hello world`;
//! - `kubectl delete pod` removes the pod and frees its port; nginx then answers 502.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test seed_walkthrough -- --nocapture`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, check_seed_node};
use e2e::cluster::Cluster;
use e2e::nginx::Nginx;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get, listening};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(90);
const NODE: &str = "aks-mywasipool-000000";
const POD: &str = "krustlet-wagi-demo";

#[test]
fn seed_walkthrough_on_the_local_control_plane() -> Result<()> {
    let started = Instant::now();
    // 1. cluster, registry, the five demo modules pushed.
    e2e::seed::build_demos()?;
    let cluster = Cluster::up()?;
    let registry = Registry::start();
    for (reference, digest) in e2e::seed::push_demos(&registry)? {
        ensure!(
            digest.starts_with("sha256:"),
            "push {reference} prints a digest: {digest:?}"
        );
        eprintln!("pushed {reference} {digest}");
    }

    // 2. the node joins the pool.
    let mut agent = Agent::start(&cluster, AgentOptions::new(NODE).pool("mywasipool"))?;
    node_ready(&cluster).with_context(|| agent.output())?;

    // 3. the seed's pod, Running 5/5.
    let pod_port = free_port();
    let pod_addr = format!("127.0.0.1:{pod_port}");
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &e2e::seed::wasi_example(&registry, pod_port)?,
    )?;
    pod_running(&cluster).with_context(|| agent.output())?;

    // 4. nginx as the seed's values.yaml serverBlock.
    let nginx_addr = format!("127.0.0.1:{}", free_port());
    let server_block = format!(
        "server {{\n  listen {nginx_addr};\n  location / {{\n    proxy_pass http://{pod_addr};\n  }}\n}}"
    );
    let mut nginx = Nginx::start(&server_block, &nginx_addr)?;

    // 5. curl EXTERNAL_IP/hello -> hello world.
    let resp = get(&nginx_addr, "/hello").with_context(|| nginx.logs())?;
    ensure!(
        (resp.status, resp.body.as_str()) == (200, "hello world\n"),
        "GET /hello through nginx: {resp:?}\nnginx:\n{}\nagent:\n{}",
        nginx.logs(),
        agent.output()
    );
    eprintln!(
        "GET http://{nginx_addr}/hello -> {} {:?}",
        resp.status, resp.body
    );

    // 6. kubectl delete pod: the object goes, the port closes, nginx answers 502.
    cluster.kubectl(&["delete", "pod", POD, "--wait=false"])?;
    cluster
        .wait_for("the pod object to disappear", TIMEOUT, || {
            let out = cluster.kubectl(&["get", "pods", "-o", "name"])?;
            Ok(!out.contains(&format!("pod/{POD}")))
        })
        .with_context(|| agent.output())?;
    cluster.wait_for("the pod port to close", TIMEOUT, || {
        Ok(!listening(&pod_addr))
    })?;
    let resp = get(&nginx_addr, "/hello")?;
    ensure!(
        resp.status == 502,
        "GET /hello through nginx after the delete: {resp:?}"
    );
    eprintln!(
        "after delete: GET http://{nginx_addr}/hello -> {}",
        resp.status
    );

    // 7. stop the agent and nginx; the cluster goes down.
    let st = agent.interrupt(Duration::from_secs(30))?;
    ensure!(
        st.success(),
        "agent exits 0 on SIGINT: {st}\n{}",
        agent.output()
    );
    ensure!(nginx.stop(), "nginx stops on SIGTERM:\n{}", nginx.logs());
    cluster.down()?;
    eprintln!("seed walk-through done in {:?}", started.elapsed());
    Ok(())
}

fn node_ready(cluster: &Cluster) -> Result<()> {
    cluster.wait_for("the node Ready in kubectl get nodes", TIMEOUT, || {
        let out = cluster.kubectl(&["get", "nodes"])?;
        Ok(out
            .lines()
            .any(|l| l.starts_with(NODE) && l.split_whitespace().nth(1) == Some("Ready")))
    })?;
    eprintln!("{}", cluster.kubectl(&["get", "nodes", "-o", "wide"])?);
    check_seed_node(cluster, NODE, "mywasipool")?;
    Ok(())
}

fn pod_running(cluster: &Cluster) -> Result<()> {
    cluster.wait_for("krustlet-wagi-demo Running with 5/5 ready", TIMEOUT, || {
        let p: Value = cluster.kubectl_json(&["get", "pod", POD])?;
        let statuses = p["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(p["status"]["phase"] == "Running"
            && statuses.len() == 5
            && statuses.iter().all(|c| c["ready"] == true))
    })?;
    let p = cluster.kubectl_json(&["get", "pod", POD])?;
    ensure!(p["spec"]["nodeName"] == NODE, "{}", p["spec"]);
    let table = cluster.kubectl(&["get", "pod", POD])?;
    eprintln!("{table}");
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with(POD) && l.contains(" 5/5 ") && l.contains(" Running ")),
        "kubectl get pod:\n{table}"
    );
    Ok(())
}
