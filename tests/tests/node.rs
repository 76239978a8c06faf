//! `wasinode node` on the real control plane (kube-apiserver, kube-scheduler,
//! kube-controller-manager): one cluster and one agent for the whole binary, and in order:
//! - the node joins by bootstrap token: its client-certificate CSR is auto-approved, and from then
//!   on it acts as `system:node:<name>` (Node authorizer + NodeRestriction accept all it does);
//! - `kubectl get nodes` shows it Ready, with the seed's labels and taints, the
//!   real kernel and OS image, a runtime version naming wasinode and wasmtime, and its Lease;
//! - a WAGI pod with the seed's nodeSelector and tolerations is scheduled there by kube-scheduler,
//!   shows Running and READY 1/1, and answers `hello world` on /hello;
//! - a pod without the tolerations is never scheduled there (it stays Pending);
//! - a pod with a broken modules annotation shows Failed with its reason in `kubectl describe`;
//! - `kubectl delete pod` frees the port and the pod object disappears;
//! - env from a ConfigMap, a Secret and fieldRefs reaches a WAGI module; a secret volume and
//!   configMap env reach a WASI command (its log file shows them) that ends Succeeded;
//! - a pod referring to a missing ConfigMap waits with CreateContainerConfigError and starts
//!   once the ConfigMap exists;
//! - the agent killed with SIGKILL and started again re-adopts its pod, which keeps serving;
//! - the kubelet API on `--port`: `kubectl logs` (plain, `--tail`, `-f`) returns a module's
//!   stderr through the API server; callers without credentials get 401, a service account
//!   without `nodes/proxy` gets 403; its `kubelet-serving` CSR, once approved, replaces the
//!   self-signed serving certificate with one from the cluster CA.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node -- --nocapture`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, wagi_pod};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get, listening};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);
const NODE: &str = "wasi-node-1";

fn pod_json(cluster: &Cluster, name: &str) -> Result<Value> {
    cluster.pod(name)
}

#[test]
fn node_joins_and_runs_pods() -> Result<()> {
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let mut agent = Agent::start(&cluster, AgentOptions::new(NODE))?;
    let port = agent.port.to_string();
    let image = registry.push_guest("hello")?;

    node_joins(&cluster).with_context(|| agent.output())?;
    acts_as_the_node(&cluster, &agent)?;
    kubelet_api(&cluster, &registry, &port).with_context(|| agent.output())?;
    wagi_pod_runs(&cluster, &image).with_context(|| agent.output())?;
    untolerated_pod_stays_pending(&cluster, &image)?;
    broken_pod_is_failed(&cluster, &image).with_context(|| agent.output())?;
    references_are_resolved(&cluster, &registry, &agent).with_context(|| agent.output())?;
    missing_config_map_waits(&cluster, &registry).with_context(|| agent.output())?;
    restart_readopts(&cluster, &mut agent, &image).with_context(|| agent.output())?;
    agent.terminate(Duration::from_secs(20))?;
    cluster.down()
}

fn node_joins(cluster: &Cluster) -> Result<()> {
    let started = Instant::now();
    cluster.wait_for("the node to be Ready", TIMEOUT, || {
        let node = cluster.kubectl_json(&["get", "node", NODE])?;
        let conditions = node["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(conditions
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"))
    })?;
    eprintln!("node Ready after {:?}", started.elapsed());
    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    let labels = &node["metadata"]["labels"];
    ensure!(labels["kubernetes.io/arch"] == "wasm32-wagi", "{labels}");
    ensure!(labels["kubernetes.io/os"] == "linux", "{labels}");
    ensure!(labels["kubernetes.io/hostname"] == NODE, "{labels}");
    ensure!(labels["agentpool"] == "wasinode", "{labels}");
    let taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for effect in ["NoSchedule", "NoExecute"] {
        ensure!(
            taints.iter().any(|t| t["key"] == "kubernetes.io/arch"
                && t["value"] == "wasm32-wagi"
                && t["effect"] == effect),
            "no {effect} taint: {taints:?}"
        );
    }
    let info = &node["status"]["nodeInfo"];
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    ensure!(info["kernelVersion"] == kernel.trim(), "{info}");
    ensure!(
        info["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("wasinode://") && v.contains("wasmtime")),
        "{info}"
    );
    ensure!(
        info["osImage"] != "" && info["osImage"] != "unknown",
        "{info}"
    );
    ensure!(node["status"]["allocatable"]["pods"] == "110", "{node}");
    let wide = cluster.kubectl(&["get", "nodes", "-o", "wide"])?;
    eprintln!("{wide}");
    ensure!(
        wide.lines()
            .any(|l| l.starts_with(NODE) && l.contains(" Ready ") && l.contains("127.0.0.1")),
        "kubectl get nodes -o wide:\n{wide}"
    );
    cluster.wait_for("the node's Lease", TIMEOUT, || {
        let lease = cluster.kubectl_json(&["get", "lease", NODE, "-n", "kube-node-lease"])?;
        Ok(lease["spec"]["holderIdentity"] == NODE
            && lease["spec"]["leaseDurationSeconds"] == 40
            && lease["metadata"]["ownerReferences"][0]["kind"] == "Node")
    })?;
    Ok(())
}

fn acts_as_the_node(cluster: &Cluster, agent: &Agent) -> Result<()> {
    let csrs = cluster.kubectl_json(&["get", "csr"])?;
    let csr = csrs["items"]
        .as_array()
        .and_then(|items| {
            items.iter().find(|c| {
                c["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
                    && c["spec"]["username"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("system:bootstrap:"))
            })
        })
        .cloned()
        .with_context(|| format!("no node client CSR from the bootstrap token: {csrs}"))?;
    ensure!(
        csr["status"]["conditions"][0]["type"] == "Approved"
            && csr["status"]["certificate"].is_string(),
        "CSR not approved and issued: {csr}"
    );
    let kubeconfig = agent.kubeconfig();
    let whoami = cluster.kubectl_with(&kubeconfig, &["auth", "whoami", "-o", "json"], None)?;
    let whoami: Value = serde_json::from_str(&whoami)?;
    ensure!(
        whoami["status"]["userInfo"]["username"] == format!("system:node:{NODE}"),
        "{whoami}"
    );
    ensure!(
        whoami["status"]["userInfo"]["groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g == "system:nodes")),
        "{whoami}"
    );
    eprintln!(
        "node identity: {} via CSR {}",
        whoami["status"]["userInfo"]["username"], csr["metadata"]["name"]
    );
    Ok(())
}

fn wagi_pod_runs(cluster: &Cluster, image: &str) -> Result<()> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let pod = wagi_pod(
        "hello-wagi",
        &addr,
        r#"{"hello": {"route": "/hello"}}"#,
        image,
        true,
    );
    let created = Instant::now();
    cluster.kubectl_stdin(&["apply", "-f", "-"], &pod.to_string())?;
    let mut bound_at = None;
    cluster.wait_for("hello-wagi Running and Ready", TIMEOUT, || {
        let p = pod_json(cluster, "hello-wagi")?;
        if bound_at.is_none() && p["spec"]["nodeName"] == NODE {
            bound_at = Some(Instant::now());
        }
        let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        Ok(p["status"]["phase"] == "Running" && ready)
    })?;
    eprintln!(
        "hello-wagi: Running+Ready {:?} after create (bound seen after {:?})",
        created.elapsed(),
        bound_at.map(|b| b - created)
    );
    let p = pod_json(cluster, "hello-wagi")?;
    ensure!(p["spec"]["nodeName"] == NODE, "{}", p["spec"]);
    let cs = &p["status"]["containerStatuses"][0];
    ensure!(cs["ready"] == true && cs["started"] == true, "{cs}");
    ensure!(
        cs["imageID"]
            .as_str()
            .is_some_and(|i| i.starts_with("sha256:")),
        "{cs}"
    );
    ensure!(cs["state"]["running"]["startedAt"].is_string(), "{cs}");
    ensure!(p["status"]["podIP"] == "127.0.0.1", "{}", p["status"]);
    ensure!(p["status"]["startTime"].is_string(), "{}", p["status"]);
    let table = cluster.kubectl(&["get", "pod", "hello-wagi", "-n", "default"])?;
    eprintln!("{table}");
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with("hello-wagi") && l.contains("1/1") && l.contains("Running")),
        "kubectl get pod:\n{table}"
    );
    let resp = get(&addr, "/hello")?;
    ensure!(
        resp.status == 200 && resp.body == "hello world\n",
        "GET /hello: {} {:?}",
        resp.status,
        resp.body
    );
    let events = cluster.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.name=hello-wagi",
    ])?;
    for reason in ["Scheduled", "Pulling", "Pulled", "Started"] {
        ensure!(events.contains(reason), "no {reason} event:\n{events}");
    }

    // Deletion: the port is freed and the object goes away.
    let deleted = Instant::now();
    cluster.kubectl(&[
        "delete",
        "pod",
        "hello-wagi",
        "-n",
        "default",
        "--wait=false",
    ])?;
    cluster.wait_for("the pod object to disappear", TIMEOUT, || {
        Ok(cluster
            .kubectl(&["get", "pods", "-n", "default", "-o", "name"])?
            .lines()
            .all(|l| l != "pod/hello-wagi"))
    })?;
    eprintln!(
        "hello-wagi: gone {:?} after kubectl delete",
        deleted.elapsed()
    );
    ensure!(
        !listening(&addr),
        "{addr} still listens after the pod was deleted"
    );
    Ok(())
}

fn untolerated_pod_stays_pending(cluster: &Cluster, image: &str) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    let pod = wagi_pod(
        "no-tolerations",
        &addr,
        r#"{"hello": {"route": "/hello"}}"#,
        image,
        false,
    );
    cluster.kubectl_stdin(&["apply", "-f", "-"], &pod.to_string())?;
    cluster.wait_for("no-tolerations Unschedulable", TIMEOUT, || {
        let p = pod_json(cluster, "no-tolerations")?;
        let conditions = p["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(conditions.iter().any(|c| {
            c["type"] == "PodScheduled" && c["status"] == "False" && c["reason"] == "Unschedulable"
        }))
    })?;
    let p = pod_json(cluster, "no-tolerations")?;
    ensure!(p["spec"]["nodeName"].is_null(), "{}", p["spec"]);
    ensure!(p["status"]["phase"] == "Pending", "{}", p["status"]);
    ensure!(!listening(&addr), "{addr} listens for an unscheduled pod");
    cluster.kubectl(&[
        "delete",
        "pod",
        "no-tolerations",
        "-n",
        "default",
        "--wait=false",
    ])?;
    Ok(())
}

fn broken_pod_is_failed(cluster: &Cluster, image: &str) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    let pod = wagi_pod("broken-json", &addr, r#"{"hello": {"route": "#, image, true);
    cluster.kubectl_stdin(&["apply", "-f", "-"], &pod.to_string())?;
    cluster.wait_for("broken-json Failed", TIMEOUT, || {
        Ok(pod_json(cluster, "broken-json")?["status"]["phase"] == "Failed")
    })?;
    let p = pod_json(cluster, "broken-json")?;
    ensure!(p["status"]["reason"] == "InvalidPodSpec", "{}", p["status"]);
    let describe = cluster.kubectl(&["describe", "pod", "broken-json", "-n", "default"])?;
    ensure!(
        describe.contains("InvalidPodSpec") && describe.contains("alpha.wagi.krustlet.dev/modules"),
        "kubectl describe pod broken-json:\n{describe}"
    );
    cluster.wait_for("the Failed event", TIMEOUT, || {
        let d = cluster.kubectl(&["describe", "pod", "broken-json", "-n", "default"])?;
        Ok(d.lines()
            .any(|l| l.contains("Warning") && l.contains("Failed")))
    })?;
    cluster.kubectl(&[
        "delete",
        "pod",
        "broken-json",
        "-n",
        "default",
        "--wait=false",
    ])?;
    cluster.wait_for("broken-json to disappear", TIMEOUT, || {
        Ok(cluster
            .kubectl(&["get", "pods", "-n", "default", "-o", "name"])?
            .lines()
            .all(|l| l != "pod/broken-json"))
    })?;
    Ok(())
}

fn apply(cluster: &Cluster, obj: &Value) -> Result<()> {
    cluster.apply(obj)
}

fn image_of(registry: &Registry, name: &str) -> Result<String> {
    registry.push_guest(name)
}

fn references_are_resolved(cluster: &Cluster, registry: &Registry, agent: &Agent) -> Result<()> {
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "app-config", "namespace": "default"},
            "data": {"GREETING": "hello from a configmap", "COLOR": "blue"}}),
    )?;
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "app-secret", "namespace": "default"},
            "stringData": {"PASSWORD": "s3cret", "token.txt": "secret file contents"}}),
    )?;
    let tolerations = json!([{"key": "kubernetes.io/arch", "operator": "Exists"}]);
    // WAGI: env reaches the module's CGI environment.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "env-wagi", "namespace": "default", "labels": {"app": "envtest"},
            "annotations": {
                "alpha.wagi.krustlet.dev/default-host": addr,
                "alpha.wagi.krustlet.dev/modules": r#"{"echo": {"route": "/env"}}"#}},
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": tolerations,
            "containers": [{"name": "echo", "image": image_of(registry, "cgi_echo")?,
                "envFrom": [{"configMapRef": {"name": "app-config"}, "prefix": "CM_"}],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "PASSWORD"}}},
                ]}]}}),
    )?;
    cluster.wait_for("env-wagi Running", TIMEOUT, || {
        Ok(pod_json(cluster, "env-wagi")?["status"]["phase"] == "Running")
    })?;
    let body = get(&addr, "/env")?.body;
    for line in [
        "CM_GREETING=hello from a configmap",
        "CM_COLOR=blue",
        "POD_NAME=env-wagi",
        "POD_APP=envtest",
        &format!("NODE_NAME={NODE}"),
        "POD_IP=127.0.0.1",
        "PASSWORD=s3cret",
    ] {
        ensure!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
    // WASI command: a secret volume and configMap env; runs to completion.
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "job-wasi", "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": tolerations,
            "volumes": [{"name": "sec", "secret": {"secretName": "app-secret"}}],
            "containers": [{"name": "job", "image": image_of(registry, "wasi_cmd")?,
                "volumeMounts": [{"name": "sec", "mountPath": "/secret", "readOnly": true}],
                "env": [
                    {"name": "READ_FILE", "value": "/secret/token.txt"},
                    {"name": "APP_COLOR", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "COLOR"}}},
                ]}]}}),
    )?;
    cluster.wait_for("job-wasi Succeeded", TIMEOUT, || {
        Ok(pod_json(cluster, "job-wasi")?["status"]["phase"] == "Succeeded")
    })?;
    let p = pod_json(cluster, "job-wasi")?;
    let term = &p["status"]["containerStatuses"][0]["state"]["terminated"];
    ensure!(term["exitCode"] == 0, "{}", p["status"]);
    let uid = p["metadata"]["uid"].as_str().unwrap_or_default();
    let log = agent
        .data_dir
        .join(format!("logs/default_job-wasi_{uid}/job.log"));
    cluster.wait_for("the job's log", TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.contains("APP_COLOR=blue") && text.contains("secret file contents"))
    })?;
    let logs = cluster.kubectl(&["logs", "job-wasi", "-n", "default"])?;
    ensure!(
        logs.contains("APP_COLOR=blue") && logs.contains("stderr line"),
        "kubectl logs job-wasi:\n{logs}"
    );
    let tail = cluster.kubectl(&["logs", "job-wasi", "-n", "default", "--tail=1"])?;
    ensure!(tail.lines().count() == 1, "kubectl logs --tail=1:\n{tail}");
    let stamped = cluster.kubectl(&["logs", "job-wasi", "-n", "default", "--timestamps"])?;
    ensure!(
        stamped.lines().all(|l| l.starts_with("20")),
        "kubectl logs --timestamps:\n{stamped}"
    );
    for name in ["env-wagi", "job-wasi"] {
        cluster.kubectl(&["delete", "pod", name, "-n", "default", "--wait=false"])?;
    }
    cluster.wait_for("env-wagi and job-wasi to disappear", TIMEOUT, || {
        let names = cluster.kubectl(&["get", "pods", "-n", "default", "-o", "name"])?;
        Ok(!names.contains("pod/env-wagi") && !names.contains("pod/job-wasi"))
    })?;
    ensure!(!listening(&addr), "{addr} still listens");
    Ok(())
}

fn missing_config_map_waits(cluster: &Cluster, registry: &Registry) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "needs-config", "namespace": "default", "annotations": {
                "alpha.wagi.krustlet.dev/default-host": addr,
                "alpha.wagi.krustlet.dev/modules": r#"{"echo": {"route": "/env"}}"#}},
            "spec": {
                "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
                "tolerations": [{"key": "kubernetes.io/arch", "operator": "Exists"}],
                "containers": [{"name": "echo", "image": image_of(registry, "cgi_echo")?,
                    "env": [{"name": "LATE", "valueFrom": {"configMapKeyRef": {"name": "late-config", "key": "VALUE"}}}]}]}}),
    )?;
    cluster.wait_for("needs-config CreateContainerConfigError", TIMEOUT, || {
        let table = cluster.kubectl(&["get", "pod", "needs-config", "-n", "default"])?;
        Ok(table.contains("CreateContainerConfigError"))
    })?;
    let describe = cluster.kubectl(&["describe", "pod", "needs-config", "-n", "default"])?;
    ensure!(
        describe.contains("configmap \"late-config\" not found"),
        "kubectl describe pod needs-config:\n{describe}"
    );
    apply(
        cluster,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "late-config", "namespace": "default"},
            "data": {"VALUE": "arrived"}}),
    )?;
    cluster.wait_for(
        "needs-config Running once the ConfigMap exists",
        TIMEOUT,
        || Ok(pod_json(cluster, "needs-config")?["status"]["phase"] == "Running"),
    )?;
    let body = get(&addr, "/env")?.body;
    ensure!(body.lines().any(|l| l == "LATE=arrived"), "{body}");
    cluster.kubectl(&[
        "delete",
        "pod",
        "needs-config",
        "-n",
        "default",
        "--wait=false",
    ])?;
    cluster.wait_for("needs-config to disappear", TIMEOUT, || {
        Ok(!cluster
            .kubectl(&["get", "pods", "-n", "default", "-o", "name"])?
            .contains("pod/needs-config"))
    })?;
    Ok(())
}

/// SIGKILL the agent while a pod runs; the agent started again (same node, same data dir)
/// re-adopts the pod. (node_failures.rs checks startTime, restartCount, logs and listeners.)
fn restart_readopts(cluster: &Cluster, agent: &mut Agent, image: &str) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    apply(
        cluster,
        &wagi_pod(
            "survivor",
            &addr,
            r#"{"hello": {"route": "/hello"}}"#,
            image,
            true,
        ),
    )?;
    cluster.wait_for("survivor Running", TIMEOUT, || {
        Ok(pod_json(cluster, "survivor")?["status"]["phase"] == "Running")
    })?;
    agent.kill()?;
    ensure!(!listening(&addr), "{addr} still listens after SIGKILL");
    let restarted = Instant::now();
    agent.restart()?;
    agent
        .wait_listening(&addr, TIMEOUT)
        .context("the re-adopted pod's listener")?;
    eprintln!(
        "survivor: serving again {:?} after the agent restarted",
        restarted.elapsed()
    );
    let resp = get(&addr, "/hello")?;
    ensure!(resp.body == "hello world\n", "{resp:?}");
    // The status is written just after the listener is up.
    cluster.wait_for("survivor Running and Ready again", TIMEOUT, || {
        let p = pod_json(cluster, "survivor")?;
        Ok(p["status"]["phase"] == "Running"
            && p["status"]["containerStatuses"][0]["ready"] == true)
    })?;
    cluster.delete_pod("survivor", TIMEOUT)?;
    ensure!(!listening(&addr), "{addr} still listens after delete");
    Ok(())
}

fn curl(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn served_issuer(port: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -issuer"
        ))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn kubelet_api(cluster: &Cluster, registry: &Registry, port: &str) -> Result<()> {
    let base = format!("https://127.0.0.1:{port}");
    ensure!(curl(&[&format!("{base}/healthz")])? == "200", "/healthz");
    let logs_url = format!("{base}/containerLogs/default/x/y");
    let code = curl(&[&logs_url])?;
    ensure!(code == "401", "no credentials: HTTP {code}");
    let token = cluster.kubectl(&["create", "token", "default", "-n", "default"])?;
    let code = curl(&[
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &logs_url,
    ])?;
    ensure!(
        code == "403",
        "service account without nodes/proxy: HTTP {code}"
    );

    // The serving certificate: approve the node's kubelet-serving CSR, as an admin would.
    let before = served_issuer(port)?;
    let mut csr_name = String::new();
    cluster.wait_for("the kubelet-serving CSR", TIMEOUT, || {
        let csrs = cluster.kubectl_json(&["get", "csr"])?;
        if let Some(c) = csrs["items"].as_array().and_then(|items| {
            items
                .iter()
                .find(|c| c["spec"]["signerName"] == "kubernetes.io/kubelet-serving")
        }) {
            csr_name = c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ensure!(
                c["spec"]["username"] == format!("system:node:{NODE}"),
                "serving CSR requested by {}",
                c["spec"]["username"]
            );
            return Ok(true);
        }
        Ok(false)
    })?;
    cluster.kubectl(&["certificate", "approve", &csr_name])?;
    let ca_subject = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(cluster.ca_crt())
        .output()?;
    let ca_subject = String::from_utf8_lossy(&ca_subject.stdout)
        .trim()
        .trim_start_matches("subject=")
        .to_string();
    cluster.wait_for("the cluster-signed serving certificate", TIMEOUT, || {
        Ok(served_issuer(port)?.trim_start_matches("issuer=") == ca_subject)
    })?;
    eprintln!("serving certificate: {before} -> issuer={ca_subject} (CSR {csr_name})");

    // kubectl logs -f through the API server while a module writes to stderr.
    let addr = format!("127.0.0.1:{}", free_port());
    apply(
        cluster,
        &wagi_pod(
            "logger",
            &addr,
            r#"{"hello": {"route": "/log"}}"#,
            &image_of(registry, "log")?,
            true,
        ),
    )?;
    cluster.wait_for("logger Running", TIMEOUT, || {
        Ok(pod_json(cluster, "logger")?["status"]["phase"] == "Running")
    })?;
    get(&addr, "/log?first")?;
    cluster.wait_for("the first request's log lines", TIMEOUT, || {
        Ok(cluster
            .kubectl(&["logs", "logger", "-n", "default"])?
            .contains("log line 3: path= query=first"))
    })?;
    let out_path = tempfile::NamedTempFile::new()?;
    let mut follow = std::process::Command::new(&cluster.kubectl_path)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(["logs", "-f", "logger", "-n", "default"])
        .stdout(std::fs::File::create(out_path.path())?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    get(&addr, "/log?second")?;
    let followed = cluster.wait_for(
        "kubectl logs -f to show the second request",
        TIMEOUT,
        || Ok(std::fs::read_to_string(out_path.path())?.contains("query=second")),
    );
    let _ = follow.kill();
    let _ = follow.wait();
    followed?;
    let text = std::fs::read_to_string(out_path.path())?;
    ensure!(text.contains("query=first"), "kubectl logs -f:\n{text}");
    cluster.kubectl(&["delete", "pod", "logger", "-n", "default", "--wait=false"])?;
    cluster.wait_for("logger to disappear", TIMEOUT, || {
        Ok(!cluster
            .kubectl(&["get", "pods", "-n", "default", "-o", "name"])?
            .contains("pod/logger"))
    })?;
    Ok(())
}
