//! Operating a `wasinode node` on the real control plane (kube-apiserver with the Node
//! authorizer and NodeRestriction, kube-scheduler, kube-controller-manager), each test with its
//! own cluster and agent joined by bootstrap token:
//! - `--drain-on-shutdown`: on SIGTERM the node cordons itself (SchedulingDisabled) and evicts
//!   the pod of a Deployment through the Eviction API (the ReplicaSet replaces it by a new pod,
//!   which stays Pending), then exits 0;
//! - with a PodDisruptionBudget that allows no disruption, the drain retries the refused
//!   eviction until `--drain-timeout`, then the agent says which pod and budget block it, stops
//!   anyway and exits 1;
//! - `--node-labels` / `--register-with-taints` show in `kubectl get node -o json`, an empty
//!   `--register-with-taints` registers none, a restarted agent merges its labels into the
//!   existing Node (not a second one) and, since NodeRestriction forbids a node to change its
//!   own taints, keeps the Node's taints and says how an admin changes them; bad syntax and
//!   labels a node may not set are refused naming the bad item;
//! - the node status: MemoryPressure, DiskPressure and PIDPressure with the kubelet's reasons,
//!   `ephemeral-storage` in capacity and allocatable, and a Ready condition that the node
//!   lifecycle controller set to Unknown (as after an outage) is corrected by the agent;
//! - `--eviction-hard`: an admin's `nodefs.available<100%` puts the node under DiskPressure with
//!   the threshold in the message, the node lifecycle controller taints it and kube-scheduler
//!   leaves a new pod Pending naming the taint; bad thresholds are refused naming the bad part;
//! - certificate renewal (forced early by the hidden `--cert-renew-after`): the node requests a
//!   second client certificate as `system:node:<name>`, gets it, keeps heartbeating with it and
//!   `kubectl logs` still works; its serving certificate is renewed the same way;
//! - an agent stopped by SIGTERM (no drain) writes, before it exits, that its pods are not
//!   ready (nothing serves them while it is away), and once started again re-adopts them Ready.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_ops`

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{Wasinode, free_port, get};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

/// One control plane at a time: the machine is small.
static SERIAL: Mutex<()> = Mutex::new(());

fn tolerations() -> Value {
    json!([
        {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoSchedule"},
        {"key": "kubernetes.io/arch", "operator": "Equal", "value": "wasm32-wagi", "effect": "NoExecute"},
    ])
}

fn start_agent(cluster: &Cluster, node: &str, extra: &[&str]) -> Result<Wasinode> {
    start_agent_on(cluster, node, &free_port().to_string(), extra)
}

/// The agent with its kubelet API on `port`.
fn start_agent_on(cluster: &Cluster, node: &str, port: &str, extra: &[&str]) -> Result<Wasinode> {
    let bootstrap = cluster.bootstrap_kubeconfig();
    let mut args = vec![
        "node",
        "--port",
        port,
        "--bootstrap-kubeconfig",
        bootstrap.to_str().context("kubeconfig path")?,
        "--node-name",
        node,
        "--node-ip",
        "127.0.0.1",
    ];
    if !extra.iter().any(|a| a.starts_with("--eviction-hard")) {
        args.push(e2e::agent::EVICTION_HARD_ARG);
    }
    args.extend_from_slice(extra);
    Wasinode::start(&args)
}

fn wait_ready(cluster: &Cluster, node: &str) -> Result<()> {
    cluster.wait_for(&format!("node {node} Ready"), TIMEOUT, || {
        let n = cluster.kubectl_json(&["get", "node", node])?;
        Ok(n["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        }))
    })
}

/// `key=value:Effect` of the Node's taints, without the ones Kubernetes manages itself.
fn registered_taints(node: &Value) -> Vec<String> {
    node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|t| {
            !t["key"]
                .as_str()
                .unwrap_or_default()
                .starts_with("node.kubernetes.io/")
        })
        .map(|t| {
            format!(
                "{}={}:{}",
                t["key"].as_str().unwrap_or_default(),
                t["value"].as_str().unwrap_or_default(),
                t["effect"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// One pod of a Deployment, as the tests look at it.
#[derive(Debug)]
#[allow(dead_code)] // `deleting` shows in the failure messages' Debug output.
struct PodRow {
    name: String,
    uid: String,
    phase: String,
    node: String,
    deleting: bool,
}

/// The pods of Deployment `app`.
fn pods_of(cluster: &Cluster, app: &str) -> Result<Vec<PodRow>> {
    let list =
        cluster.kubectl_json(&["get", "pods", "-n", "default", "-l", &format!("app={app}")])?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            PodRow {
                name: s(&p["metadata"]["name"]),
                uid: s(&p["metadata"]["uid"]),
                phase: s(&p["status"]["phase"]),
                node: s(&p["spec"]["nodeName"]),
                deleting: !p["metadata"]["deletionTimestamp"].is_null(),
            }
        })
        .collect())
}

fn hello_deployment(app: &str, addr: &str, hello: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {
                    "labels": {"app": app},
                    "annotations": {
                        "alpha.wagi.krustlet.dev/default-host": addr,
                        "alpha.wagi.krustlet.dev/modules": r#"{"hello": {"route": "/hello"}}"#,
                    },
                },
                "spec": {
                    "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
                    "tolerations": tolerations(),
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "hello", "image": hello}],
                },
            },
        },
    })
}

/// Waits for the pod of Deployment `app` to run on `node`; returns its (name, uid).
fn running_pod(cluster: &Cluster, app: &str, node: &str) -> Result<(String, String)> {
    let mut first = None;
    cluster.wait_for(
        &format!("the pod of {app} Running on the node"),
        TIMEOUT,
        || {
            first = pods_of(cluster, app)?
                .into_iter()
                .find(|p| p.phase == "Running" && p.node == node);
            Ok(first.is_some())
        },
    )?;
    let pod = first.context("no pod")?;
    Ok((pod.name, pod.uid))
}

#[test]
fn drain_on_shutdown_evicts_pods_and_cordons() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const NODE: &str = "drain-node";
    let guests = Registry::start();
    let hello = guests.push_guest("hello")?;
    let cluster = Cluster::up()?;
    let mut agent = start_agent(
        &cluster,
        NODE,
        &["--drain-on-shutdown", "--drain-timeout", "90s"],
    )?;
    wait_ready(&cluster, NODE).with_context(|| agent.output())?;

    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_deployment("web", &addr, &hello))?;
    let (name, uid) = running_pod(&cluster, "web", NODE).with_context(|| agent.output())?;
    let body = get(&addr, "/hello")?;
    ensure!(
        body.body.contains("hello world"),
        "GET /hello: {:?}",
        body.body
    );

    agent.signal("TERM")?;
    let status = agent.wait_exit(Duration::from_secs(120))?;
    let out = agent.output();
    ensure!(status.success(), "the agent exited with {status}:\n{out}");
    ensure!(
        out.contains(&format!("evicting default/{name}")),
        "the agent did not say it evicted {name}:\n{out}"
    );

    // kubectl get nodes: the node is cordoned.
    let table = cluster.kubectl(&["get", "node", NODE])?;
    ensure!(
        table.contains("SchedulingDisabled"),
        "kubectl get node:\n{table}"
    );
    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    ensure!(node["spec"]["unschedulable"] == true, "{node}");

    // The evicted pod is gone; its ReplicaSet made a new one, which cannot go to the cordoned
    // node and so stays Pending.
    let pods = pods_of(&cluster, "web")?;
    ensure!(
        pods.iter().all(|p| p.uid != uid),
        "the evicted pod {name} ({uid}) is still there: {pods:?}"
    );
    cluster.wait_for("the replacement pod", TIMEOUT, || {
        Ok(pods_of(&cluster, "web")?
            .iter()
            .any(|p| p.uid != uid && p.phase == "Pending" && p.node.is_empty()))
    })?;
    // The pod's port was freed when it was deleted.
    ensure!(!e2e::wasinode::listening(&addr), "{addr} still listens");
    cluster.down()
}

#[test]
fn drain_blocked_by_a_disruption_budget_says_why() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const NODE: &str = "budget-node";
    let guests = Registry::start();
    let hello = guests.push_guest("hello")?;
    let cluster = Cluster::up()?;
    let mut agent = start_agent(
        &cluster,
        NODE,
        &["--drain-on-shutdown", "--drain-timeout", "6s"],
    )?;
    wait_ready(&cluster, NODE).with_context(|| agent.output())?;
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_deployment("web", &addr, &hello))?;
    // A second workload without a budget (listed after the first): its eviction is not held up
    // by the first's.
    let free_addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_deployment("worker", &free_addr, &hello))?;
    cluster.apply(&json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "web-budget", "namespace": "default"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
    }))?;
    let (name, uid) = running_pod(&cluster, "web", NODE).with_context(|| agent.output())?;
    let (free_name, free_uid) =
        running_pod(&cluster, "worker", NODE).with_context(|| agent.output())?;
    cluster.wait_for("the budget to count the pod", TIMEOUT, || {
        let pdb = cluster.kubectl_json(&["get", "pdb", "web-budget", "-n", "default"])?;
        Ok(pdb["status"]["currentHealthy"] == 1)
    })?;

    agent.signal("TERM")?;
    let status = agent.wait_exit(Duration::from_secs(60))?;
    let out = agent.output();
    ensure!(
        status.code() == Some(1),
        "the agent exited with {status}:\n{out}"
    );
    for want in [
        format!("default/{name}: eviction refused"),
        "disruption budget web-budget".to_string(),
        format!("cannot evict pod default/{name}"),
        "kubectl get pdb -n default".to_string(),
    ] {
        ensure!(out.contains(&want), "no {want:?} in the output:\n{out}");
    }
    // Not evicted: the same pod object is still there (the node stopped running it).
    ensure!(
        pods_of(&cluster, "web")?.iter().any(|p| p.uid == uid),
        "the pod was evicted despite its budget"
    );
    // The other workload's pod was evicted meanwhile: replaced by a new, Pending one.
    ensure!(
        out.contains(&format!("evicting default/{free_name}")),
        "{free_name} was not evicted:\n{out}"
    );
    cluster.wait_for("the worker pod replaced", TIMEOUT, || {
        let pods = pods_of(&cluster, "worker")?;
        Ok(pods.iter().all(|p| p.uid != free_uid) && pods.iter().any(|p| p.phase == "Pending"))
    })?;
    cluster.down()
}

#[test]
fn labels_and_taints_are_configurable() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Bad syntax: clap refuses it and names the bad item (no cluster needed).
    for (flag, value, bad) in [
        ("--node-labels", "tier=edge,oops", "oops"),
        (
            "--register-with-taints",
            "a=b:NoSchedule,c=d:Sometimes",
            "c=d:Sometimes",
        ),
        ("--node-labels", "bad key=x", "bad key"),
        (
            "--node-labels",
            "node-role.kubernetes.io/worker=",
            "node-role.kubernetes.io/worker",
        ),
        (
            "--eviction-hard",
            "memory.available<100Mi,imagefs.available<15%",
            "imagefs.available",
        ),
        ("--eviction-hard", "nodefs.available<ten%", "ten"),
    ] {
        let out = Command::new(e2e::wasinode::binary())
            .args([
                "node",
                "--node-name",
                "n",
                "--node-ip",
                "127.0.0.1",
                flag,
                value,
            ])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{flag} {value:?} was accepted");
        ensure!(
            err.contains(flag) && err.contains(bad),
            "{flag} {value:?}: the error does not name {bad:?}:\n{err}"
        );
    }

    const NODE: &str = "labelled-node";
    const BARE: &str = "untainted-node";
    let cluster = Cluster::up()?;
    let mut agent = start_agent(
        &cluster,
        NODE,
        &[
            "--node-labels",
            "tier=edge,example.com/zone=lab",
            "--register-with-taints",
            "dedicated=wasm:NoSchedule,kubernetes.io/arch=wasm32-wagi:NoExecute",
        ],
    )?;
    let bare = start_agent(&cluster, BARE, &["--register-with-taints", ""])?;
    wait_ready(&cluster, NODE).with_context(|| agent.output())?;
    wait_ready(&cluster, BARE).with_context(|| bare.output())?;

    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    let labels = &node["metadata"]["labels"];
    for (k, v) in [
        ("tier", "edge"),
        ("example.com/zone", "lab"),
        ("kubernetes.io/arch", "wasm32-wagi"),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/hostname", NODE),
        ("agentpool", "wasinode"),
    ] {
        ensure!(
            labels[k] == v,
            "label {k} is {}, not {v}: {labels}",
            labels[k]
        );
    }
    let mut taints = registered_taints(&node);
    taints.sort();
    ensure!(
        taints
            == [
                "dedicated=wasm:NoSchedule",
                "kubernetes.io/arch=wasm32-wagi:NoExecute"
            ],
        "taints: {taints:?}"
    );
    let bare_node = cluster.kubectl_json(&["get", "node", BARE])?;
    ensure!(
        registered_taints(&bare_node).is_empty(),
        "--register-with-taints \"\": {:?}",
        registered_taints(&bare_node)
    );

    // Restarted with other labels: the same Node is updated (labels merged), not duplicated.
    agent.signal("TERM")?;
    agent.wait_exit(Duration::from_secs(30))?;
    let uid = node["metadata"]["uid"].clone();
    // ... with other taints too, which NodeRestriction does not let a node change on an
    // existing Node: they stay, and the agent says how to change them.
    let mut agent = start_agent(
        &cluster,
        NODE,
        &[
            "--node-labels",
            "tier=core",
            "--register-with-taints",
            "other=x:NoExecute",
        ],
    )?;
    cluster
        .wait_for("the label tier=core", TIMEOUT, || {
            let n = cluster.kubectl_json(&["get", "node", NODE])?;
            Ok(n["metadata"]["labels"]["tier"] == "core")
        })
        .with_context(|| agent.output())?;
    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    ensure!(node["metadata"]["uid"] == uid, "the Node was re-created");
    ensure!(
        node["metadata"]["labels"]["example.com/zone"] == "lab",
        "a label of the first run was dropped: {}",
        node["metadata"]["labels"]
    );
    let mut kept = registered_taints(&node);
    kept.sort();
    ensure!(kept == taints, "taints changed from {taints:?} to {kept:?}");
    agent
        .wait_output("not allowed to modify taints", TIMEOUT)
        .and_then(|_| agent.wait_output(&format!("kubectl taint nodes {NODE}"), TIMEOUT))?;
    let names = cluster.kubectl(&["get", "nodes", "-o", "name"])?;
    ensure!(
        names.matches(&format!("node/{NODE}\n")).count() == 1,
        "kubectl get nodes:\n{names}"
    );
    drop(agent);
    drop(bare);
    cluster.down()
}

#[test]
fn node_status_tells_the_truth() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const NODE: &str = "status-node";
    let cluster = Cluster::up()?;
    let agent = start_agent(&cluster, NODE, &[])?;
    wait_ready(&cluster, NODE).with_context(|| agent.output())?;
    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    let status = &node["status"];
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    for (type_, reason) in [
        ("MemoryPressure", "KubeletHasSufficientMemory"),
        ("DiskPressure", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "KubeletHasSufficientPID"),
        ("Ready", "KubeletReady"),
    ] {
        let want = if type_ == "Ready" { "True" } else { "False" };
        ensure!(
            conditions
                .iter()
                .any(|c| c["type"] == type_ && c["status"] == want && c["reason"] == reason),
            "no {type_}={want} ({reason}) in {conditions:?}"
        );
    }
    for field in ["capacity", "allocatable"] {
        let storage = status[field]["ephemeral-storage"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            !storage.is_empty(),
            "no ephemeral-storage in {field}: {}",
            status[field]
        );
    }

    // What the node lifecycle controller writes when a node stops posting its status.
    cluster.kubectl(&[
        "patch",
        "node",
        NODE,
        "--subresource=status",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"Unknown","reason":"NodeStatusUnknown","message":"Kubelet stopped posting node status."}]}}"#,
    ])?;
    cluster
        .wait_for("the agent to post Ready=True again", TIMEOUT, || {
            let n = cluster.kubectl_json(&["get", "node", NODE])?;
            Ok(n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Ready" && c["status"] == "True" && c["reason"] == "KubeletReady"
                })
            }))
        })
        .with_context(|| agent.output())?;
    drop(agent);
    cluster.down()
}

/// A cluster admin's `--eviction-hard` decides when the node is under pressure, as the
/// kubelet's does: with `nodefs.available<100%` (a threshold no filesystem meets) the Node reports
/// DiskPressure with the threshold in its message and no allocatable ephemeral storage, the node
/// lifecycle controller taints it `node.kubernetes.io/disk-pressure`, and kube-scheduler places
/// no new pod there and says why.
#[test]
fn the_admins_eviction_thresholds_decide_disk_pressure() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const NODE: &str = "pressed-node";
    let cluster = Cluster::up()?;
    let agent = start_agent(
        &cluster,
        NODE,
        &["--eviction-hard=memory.available<100Mi,nodefs.available<100%"],
    )?;
    wait_ready(&cluster, NODE).with_context(|| agent.output())?;
    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    let conditions = node["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let disk = conditions
        .iter()
        .find(|c| c["type"] == "DiskPressure")
        .with_context(|| format!("no DiskPressure in {conditions:?}"))?;
    ensure!(
        disk["status"] == "True"
            && disk["reason"] == "KubeletHasDiskPressure"
            && disk["message"]
                .as_str()
                .is_some_and(|m| m.contains("(threshold 100%)")),
        "{disk}"
    );
    ensure!(
        node["status"]["allocatable"]["ephemeral-storage"] == "0",
        "allocatable: {}",
        node["status"]["allocatable"]
    );
    cluster.wait_for("the disk-pressure taint", TIMEOUT, || {
        let n = cluster.kubectl_json(&["get", "node", NODE])?;
        Ok(n["spec"]["taints"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| {
                t["key"] == "node.kubernetes.io/disk-pressure" && t["effect"] == "NoSchedule"
            })
        }))
    })?;
    cluster.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pressed"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": tolerations(),
            "containers": [{"name": "c", "image": "127.0.0.1:1/none:v1"}],
        },
    }))?;
    cluster.wait_for(
        "kube-scheduler to name the disk-pressure taint",
        TIMEOUT,
        || {
            let events = cluster.kubectl(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=pressed,reason=FailedScheduling",
                "-o",
                "jsonpath={.items[*].message}",
            ])?;
            Ok(events.contains("node.kubernetes.io/disk-pressure"))
        },
    )?;
    let pod = cluster.kubectl_json(&["get", "pod", "pressed"])?;
    ensure!(
        pod["status"]["phase"] == "Pending" && pod["spec"]["nodeName"].is_null(),
        "{}",
        pod["status"]
    );
    drop(agent);
    cluster.down()
}

/// Certificate signing requests for `signer` as (name, requesting user, issued).
fn csrs(cluster: &Cluster, signer: &str) -> Result<Vec<(String, String, bool)>> {
    let list = cluster.kubectl_json(&["get", "csr"])?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| c["spec"]["signerName"] == signer)
        .map(|c| {
            (
                c["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c["spec"]["username"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c["status"]["certificate"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
            )
        })
        .collect())
}

/// `issuer=...` and `serial=...` of the certificate the kubelet API on `port` serves.
fn served_cert(port: &str) -> Result<(String, String)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -issuer -serial"
        ))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Ok((field("issuer="), field("serial=")))
}

#[test]
fn certificates_are_renewed() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const NODE: &str = "renewing-node";
    const CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
    const SERVING: &str = "kubernetes.io/kubelet-serving";
    let user = format!("system:node:{NODE}");
    let guests = Registry::start();
    let log = guests.push_guest("log")?;
    let cluster = Cluster::up()?;
    let port = free_port().to_string();
    let agent = start_agent_on(&cluster, NODE, &port, &["--cert-renew-after", "8s"])?;
    wait_ready(&cluster, NODE).with_context(|| agent.output())?;
    let kubeconfig = agent.data_dir.join("kubelet.kubeconfig");
    let first_kubeconfig = std::fs::read_to_string(&kubeconfig)?;

    // The client certificate: the first CSR was made with the bootstrap token, the renewal
    // with the node's own identity; the controller-manager approves and signs both.
    cluster
        .wait_for("a renewed client certificate", TIMEOUT, || {
            let c = csrs(&cluster, CLIENT)?;
            Ok(c.iter().any(|(_, u, issued)| *u != user && *issued)
                && c.iter().any(|(_, u, issued)| *u == user && *issued))
        })
        .with_context(|| agent.output())?;
    cluster.wait_for("the renewed kubeconfig", TIMEOUT, || {
        Ok(std::fs::read_to_string(&kubeconfig)? != first_kubeconfig)
    })?;

    // The serving certificate, approved by an admin, is renewed too: the kubelet API serves
    // one cluster-signed certificate, then another.
    let ca = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(cluster.ca_crt())
        .output()?;
    let ca = String::from_utf8_lossy(&ca.stdout)
        .trim()
        .trim_start_matches("subject=")
        .trim()
        .to_string();
    let mut approved = Vec::new();
    let mut served = Vec::new();
    cluster
        .wait_for(
            "two cluster-signed serving certificates in turn",
            TIMEOUT,
            || {
                for (name, u, _) in csrs(&cluster, SERVING)? {
                    ensure!(u == user, "serving CSR {name} requested by {u}");
                    if !approved.contains(&name) {
                        cluster.kubectl(&["certificate", "approve", &name])?;
                        approved.push(name);
                    }
                }
                let (issuer, serial) = served_cert(&port)?;
                if issuer == ca && !served.contains(&serial) {
                    served.push(serial);
                }
                Ok(served.len() >= 2)
            },
        )
        .with_context(|| agent.output())?;

    // Still the node after renewals: the Lease keeps being renewed...
    let renewed = cluster.lease_renew_time(NODE)?;
    cluster
        .wait_for("the Lease renewed again", TIMEOUT, || {
            Ok(cluster.lease_renew_time(NODE)? != renewed)
        })
        .with_context(|| agent.output())?;
    // ... pods run, and kubectl logs reaches the kubelet API.
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "logger",
            "namespace": "default",
            "annotations": {
                "alpha.wagi.krustlet.dev/default-host": addr,
                "alpha.wagi.krustlet.dev/modules": r#"{"log": {"route": "/log"}}"#,
            },
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": tolerations(),
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "log", "image": log}],
        },
    }))?;
    cluster
        .wait_for("logger Running", TIMEOUT, || {
            Ok(cluster.pod("logger")?["status"]["phase"] == "Running")
        })
        .with_context(|| agent.output())?;
    get(&addr, "/log?after-renewal")?;
    cluster
        .wait_for("kubectl logs after the renewals", TIMEOUT, || {
            Ok(cluster
                .kubectl(&["logs", "logger", "-n", "default"])?
                .contains("query=after-renewal"))
        })
        .with_context(|| agent.output())?;
    // The pod keeps serving across a further renewal, and its logs stay reachable.
    let renewed_certs = |cluster: &Cluster| -> Result<usize> {
        Ok(csrs(cluster, CLIENT)?
            .iter()
            .filter(|c| c.1 == user && c.2)
            .count())
    };
    let before = renewed_certs(&cluster)?;
    cluster
        .wait_for("one more client certificate renewal", TIMEOUT, || {
            Ok(renewed_certs(&cluster)? > before)
        })
        .with_context(|| agent.output())?;
    let answer = get(&addr, "/log?later")?;
    ensure!(
        answer.body.contains("logged 3 lines"),
        "GET /log: {:?}",
        answer.body
    );
    cluster
        .wait_for("kubectl logs after one more renewal", TIMEOUT, || {
            Ok(cluster
                .kubectl(&["logs", "logger", "-n", "default"])?
                .contains("query=later"))
        })
        .with_context(|| agent.output())?;
    eprintln!(
        "client certificates renewed: {}; serving CSRs approved: {}",
        renewed_certs(&cluster)?,
        approved.len()
    );
    drop(agent);
    cluster.down()
}

/// The pods named `stop-*` and whether each is Ready, in one read of the API.
fn readiness(cluster: &Cluster) -> Result<Vec<(String, bool)>> {
    let list = cluster.kubectl_json(&["get", "pods", "-n", "default"])?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("stop-"))
        })
        .map(|p| {
            let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ready,
            )
        })
        .collect())
}

#[test]
fn a_stopping_agent_says_its_pods_are_not_ready() -> Result<()> {
    use e2e::agent::{Agent, AgentOptions, hello_pod};
    const PODS: usize = 12;
    let guests = Registry::start();
    let hello = guests.push_guest("hello")?;
    let cluster = Cluster::up()?;
    let mut agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-stopping"), TIMEOUT)?;
    for i in 0..PODS {
        let mut pod = hello_pod(
            &format!("stop-{i}"),
            &format!("127.0.0.1:{}", free_port()),
            &hello,
        );
        pod["spec"]["nodeName"] = "wasi-stopping".into();
        cluster.apply(&pod)?;
    }
    cluster
        .wait_for("every pod Ready", TIMEOUT, || {
            let r = readiness(&cluster)?;
            Ok(r.len() == PODS && r.iter().all(|(_, ready)| *ready))
        })
        .with_context(|| agent.output())?;
    let status = agent.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "agent exit: {status}\n{}", agent.output());
    // Read at once: the node controller would only mark them after its grace period.
    let after = readiness(&cluster)?;
    let still_ready: Vec<&String> = after.iter().filter(|(_, r)| *r).map(|(n, _)| n).collect();
    ensure!(
        still_ready.is_empty(),
        "pods still Ready after the agent exited: {still_ready:?}\n{}",
        agent.output()
    );
    agent.restart()?;
    cluster
        .wait_for("every pod Ready again after the restart", TIMEOUT, || {
            let r = readiness(&cluster)?;
            Ok(r.len() == PODS && r.iter().all(|(_, ready)| *ready))
        })
        .with_context(|| agent.output())?;
    agent.terminate(Duration::from_secs(30))?;
    cluster.down()
}
