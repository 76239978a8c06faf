//! Components on a node: the real control plane (kube-apiserver, kube-scheduler,
//! kube-controller-manager, etcd), images pushed to the test registry (Debian's
//! docker-registry) with `wasinode push`, pods scheduled by kube-scheduler and read back with
//! the kubectl built from the same sources:
//! - a wasi:http component pod Ready and serving on its containerPort at the node's pod
//!   address, with env from a literal, a ConfigMap and a fieldRef, its stderr in `kubectl logs`,
//!   a trap and a hang failing only their request, 100 MiB streamed each way with the agent's
//!   RSS bounded, outbound allowed and denied by the pod's annotation;
//! - one pod mixing a WAGI route and a component route;
//! - a command component with args, its output in `kubectl logs`, terminated with its exit code;
//!   one calling `wasi:cli/exit.exit-with-code(42)` terminated with 42;
//! - a component's own `wasi:sockets` TCP connect allowed by a `tcp://` entry, another port
//!   and UDP refused;
//! - a component exporting nothing servable: Failed, and `kubectl describe pod` says what it
//!   exports.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_components`

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Result, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{download, echo_stream, free_port, get, upstream};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A pod for the seed's WASI nodes (nodeSelector and tolerations), scheduled by kube-scheduler.
fn pod(name: &str, annotations: Value, spec: Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": serde_json::from_str::<Value>(TOLERATIONS).unwrap_or(Value::Null),
            "terminationGracePeriodSeconds": 2,
        },
    });
    if let (Some(dst), Some(src)) = (p["spec"].as_object_mut(), spec.as_object()) {
        for (k, v) in src {
            dst.insert(k.clone(), v.clone());
        }
    }
    p
}

fn ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn wait_ready(cluster: &Cluster, name: &str) -> Result<()> {
    cluster.wait_for(&format!("{name} Running and Ready"), TIMEOUT, || {
        Ok(ready(&cluster.pod(name)?))
    })
}

#[test]
fn components_run_on_a_node() -> Result<()> {
    let registry = Registry::start();
    let http_hello = registry.push_component("http-hello")?;
    let command = registry.push_component("command-hello")?;
    let nothing = registry.push_component("reactor-nothing")?;
    let service = registry.push_component("http-hello-p3")?;
    let sockets = registry.push_component("http-sockets")?;
    let wagi_hello = registry.push_guest("hello")?;
    pushed_as_cncf_component(
        &registry,
        "components/http-hello",
        "wasi:http/incoming-handler@",
    )?;
    let cluster = Cluster::up()?;
    let mut agent = Agent::start_ready(&cluster, AgentOptions::new("wasm-components"), TIMEOUT)?;

    http_component_pod(&cluster, &agent, &http_hello)?;
    mixed_pod(&cluster, &http_hello, &wagi_hello)?;
    service_pod(&cluster, &service)?;
    command_component_pod(&cluster, &command)?;
    exit_with_code_pod(&cluster, &command)?;
    sockets_pod(&cluster, &sockets)?;
    nothing_to_run(&cluster, &nothing)?;
    ensure!(
        agent.running(),
        "the agent kept running: {}",
        agent.output()
    );
    Ok(())
}

/// `wasinode push` wrote the CNCF wasm artifact: its config type, and in the config the
/// component's exports (read over the registry's API, as `crane`/`wkg` would).
fn pushed_as_cncf_component(registry: &Registry, repo: &str, export: &str) -> Result<()> {
    let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
    let m = registry.request("GET", &format!("/v2/{repo}/manifests/v1"), &accept, b"");
    let m: Value = serde_json::from_str(&m.body)?;
    ensure!(
        m["config"]["mediaType"] == "application/vnd.wasm.config.v0+json",
        "manifest of {repo}: {m}"
    );
    let digest = m["config"]["digest"].as_str().unwrap_or_default();
    let c = registry.request("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], b"");
    let c: Value = serde_json::from_str(&c.body)?;
    let exports = c["component"]["exports"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        c["os"] == "wasip2"
            && exports
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.starts_with(export))),
        "config of {repo}: {c}"
    );
    Ok(())
}

fn http_component_pod(cluster: &Cluster, agent: &Agent, image: &str) -> Result<()> {
    let allowed = upstream("allowed upstream")?;
    let other = upstream("other upstream")?;
    cluster.apply(&json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "component-config", "namespace": "default"},
        "data": {"color": "teal"},
    }))?;
    let port = free_port();
    cluster.apply(&pod(
        "web-component",
        json!({"wasinode.dev/allowed-outbound-hosts": format!("http://{allowed}")}),
        json!({"containers": [{
            "name": "web",
            "image": image,
            "ports": [{"containerPort": port}],
            "env": [
                {"name": "GREETING", "value": "hello from the spec"},
                {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "component-config", "key": "color"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
        }]}),
    ))?;
    wait_ready(cluster, "web-component")?;
    let p = cluster.pod("web-component")?;
    ensure!(p["spec"]["nodeName"] == "wasm-components", "{}", p["spec"]);
    let ip = p["status"]["podIP"]
        .as_str()
        .unwrap_or("127.0.0.1")
        .to_string();
    let a = format!("{ip}:{port}");
    let r = get(&a, "/")?;
    ensure!(
        (r.status, r.body.as_str()) == (200, "Hello from a wasi:http component\n"),
        "{r:?}"
    );
    ensure!(get(&a, "/env?GREETING")?.body == "hello from the spec");
    ensure!(
        get(&a, "/env?COLOR")?.body == "teal",
        "env from a ConfigMap"
    );
    ensure!(
        get(&a, "/env?POD_NAME")?.body == "web-component",
        "env from a fieldRef"
    );

    // stderr and failures reach `kubectl logs`; a trap and a hang fail alone.
    ensure!(get(&a, "/stderr?component%20stderr%20line")?.body == "logged\n");
    ensure!(get(&a, "/trap")?.status == 500);
    cluster.wait_for(
        "the component's stderr and trap in kubectl logs",
        TIMEOUT,
        || {
            let logs = cluster.kubectl(&["logs", "web-component", "-n", "default"])?;
            Ok(logs.contains("component stderr line")
                && logs.contains("GET /trap: the module trapped"))
        },
    )?;
    ensure!(get(&a, "/")?.status == 200, "still serving after the trap");

    // Outbound: the annotation's host only.
    let r = get(&a, &format!("/fetch?http://{allowed}/"))?;
    ensure!(
        (r.status, r.body.as_str()) == (200, "upstream 200\nallowed upstream"),
        "{r:?}"
    );
    let r = get(&a, &format!("/fetch?http://{other}/"))?;
    ensure!(
        (r.status, r.body.trim()) == (502, "HTTP-request-denied"),
        "{r:?}"
    );

    // 100 MiB each way, never whole in the agent.
    let base = agent.rss_kib()?;
    let mut peak = base;
    let size: u64 = 100 << 20;
    let mut sample = |_: u64| peak = peak.max(agent.rss_kib().unwrap_or(0));
    let (status, echoed, _) = echo_stream(&a, "/echo", size, &mut sample)?;
    ensure!((status, echoed) == (200, size), "echo {status} {echoed}");
    let (status, _, got) = download(&a, &format!("/big?{size}"), &mut sample)?;
    ensure!((status, got) == (200, size), "download {status} {got}");
    eprintln!("node agent RSS: {base} KiB before, {peak} KiB at most while 2 x 100 MiB streamed");
    ensure!(
        peak < base + 48 * 1024,
        "resident memory went from {base} KiB to {peak} KiB while 100 MiB streamed"
    );
    Ok(())
}

fn mixed_pod(cluster: &Cluster, component: &str, wagi: &str) -> Result<()> {
    let a = format!("127.0.0.1:{}", free_port());
    cluster.apply(&pod(
        "mixed",
        json!({
            "alpha.wagi.krustlet.dev/default-host": a,
            "alpha.wagi.krustlet.dev/modules":
                r#"{"hello": {"route": "/hello"}, "comp": {"route": "/env"}}"#,
        }),
        json!({"containers": [
            {"name": "hello", "image": wagi},
            {"name": "comp", "image": component, "env": [{"name": "WHO", "value": "the component"}]},
        ]}),
    ))?;
    wait_ready(cluster, "mixed")?;
    ensure!(get(&a, "/hello")?.body == "hello world\n", "the WAGI route");
    ensure!(
        get(&a, "/env?WHO")?.body == "the component",
        "the component route"
    );
    let p = cluster.pod("mixed")?;
    let statuses = p["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        statuses.len() == 2 && statuses.iter().all(|c| c["ready"] == true),
        "{statuses:?}"
    );
    Ok(())
}

fn service_pod(cluster: &Cluster, image: &str) -> Result<()> {
    let port = free_port();
    cluster.apply(&pod(
        "p3-service",
        json!({}),
        json!({"containers": [{"name": "web", "image": image, "ports": [{"containerPort": port}]}]}),
    ))?;
    wait_ready(cluster, "p3-service")?;
    let ip = cluster.pod("p3-service")?["status"]["podIP"]
        .as_str()
        .unwrap_or("127.0.0.1")
        .to_string();
    let a = format!("{ip}:{port}");
    // A burst that finds no instance yet starts one per request (wasmtime-wasi-http's
    // ProxyHandler counts a worker once it is instantiated), and each serving thread keeps its
    // own instances, each new connection going to the next thread: a request per thread (two
    // on these machines) first makes the instances that the burst then shares.
    for _ in 0..2 {
        let first = get(&a, "/")?;
        ensure!(first.status == 200, "{first:?}");
    }
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || get(&a, "/slow?400"))
        })
        .collect();
    let mut in_flight = Vec::new();
    for t in burst {
        let r = t.join().map_err(|_| anyhow::anyhow!("panicked"))??;
        ensure!(r.status == 200 && r.body == "slow done\n", "{r:?}");
        in_flight.push(
            r.header("x-instance-in-flight")
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        );
    }
    ensure!(
        in_flight.iter().any(|k| *k > 1),
        "one reused instance served several requests at once: {in_flight:?}"
    );
    Ok(())
}

fn command_component_pod(cluster: &Cluster, image: &str) -> Result<()> {
    cluster.apply(&pod(
        "cmd-component",
        json!({}),
        json!({
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": image,
                "args": ["alpha", "beta", "--exit", "2"],
                "env": [{"name": "GREETING", "value": "node"}],
            }],
        }),
    ))?;
    cluster.wait_for("cmd-component Failed", TIMEOUT, || {
        Ok(cluster.pod("cmd-component")?["status"]["phase"] == "Failed")
    })?;
    let p = cluster.pod("cmd-component")?;
    let term = &p["status"]["containerStatuses"][0]["state"]["terminated"];
    // A non-zero exit through the preview-1 adapter is wasi:cli/exit's error: exit code 1.
    ensure!(term["exitCode"] == 1, "{term}");
    let logs = cluster.kubectl(&["logs", "cmd-component", "-n", "default"])?;
    for want in [
        "arg 1: alpha",
        "arg 2: beta",
        "env GREETING=node",
        "to stderr",
    ] {
        ensure!(logs.contains(want), "{want:?} not in:\n{logs}");
    }
    Ok(())
}

/// A command component that calls `wasi:cli/exit.exit-with-code(42)` itself: the container's
/// terminated state carries 42 (not the 1 the preview-1 adapter's exit gives).
fn exit_with_code_pod(cluster: &Cluster, image: &str) -> Result<()> {
    cluster.apply(&pod(
        "exit-code-component",
        json!({}),
        json!({
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": image,
                "args": ["--exit-with-code", "42"],
            }],
        }),
    ))?;
    cluster.wait_for("exit-code-component Failed", TIMEOUT, || {
        Ok(cluster.pod("exit-code-component")?["status"]["phase"] == "Failed")
    })?;
    let p = cluster.pod("exit-code-component")?;
    let term = &p["status"]["containerStatuses"][0]["state"]["terminated"];
    ensure!(
        term["exitCode"] == 42 && term["reason"] == "Error",
        "{term}"
    );
    Ok(())
}

/// The guest's own `wasi:sockets` on a node: a TCP connect to the test's loopback listener
/// goes through under the pod's `tcp://` entry (the listener reads the guest's line), another
/// port is `access-denied` and its listener sees nothing, and UDP is refused.
fn sockets_pod(cluster: &Cluster, image: &str) -> Result<()> {
    let target = TcpListener::bind("127.0.0.1:0")?;
    let other = TcpListener::bind("127.0.0.1:0")?;
    target.set_nonblocking(true)?;
    other.set_nonblocking(true)?;
    let (t, o) = (target.local_addr()?, other.local_addr()?);
    let port = free_port();
    cluster.apply(&pod(
        "sockets-component",
        json!({"wasinode.dev/allowed-outbound-hosts": format!("tcp://{t}")}),
        json!({"containers": [{"name": "web", "image": image, "ports": [{"containerPort": port}]}]}),
    ))?;
    wait_ready(cluster, "sockets-component")?;
    let p = cluster.pod("sockets-component")?;
    let ip = p["status"]["podIP"].as_str().unwrap_or("127.0.0.1");
    let a = format!("{ip}:{port}");
    let r = get(&a, &format!("/connect?{t}"))?;
    ensure!((r.status, r.body.as_str()) == (200, "connected\n"), "{r:?}");
    let (conn, _) = target.accept()?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    (&conn).read_to_string(&mut line)?;
    ensure!(line == "hello from a wasi:sockets guest\n", "{line:?}");
    let r = get(&a, &format!("/connect?{o}"))?;
    ensure!(
        (r.status, r.body.as_str()) == (502, "access-denied\n"),
        "{r:?}"
    );
    ensure!(
        other
            .accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the other port's listener saw a connection"
    );
    let r = get(&a, &format!("/udp?{t}"))?;
    ensure!(
        (r.status, r.body.as_str()) == (502, "access-denied\n"),
        "{r:?}"
    );
    Ok(())
}

fn nothing_to_run(cluster: &Cluster, image: &str) -> Result<()> {
    cluster.apply(&pod(
        "nothing-to-run",
        json!({}),
        json!({"containers": [{"name": "main", "image": image}]}),
    ))?;
    cluster.wait_for(
        "nothing-to-run refused with its exports named",
        TIMEOUT,
        || {
            let d = cluster.describe_pod("nothing-to-run")?;
            Ok(d.contains("exports neither wasi:http/incoming-handler")
                && d.contains("wasinode:test/nothing"))
        },
    )?;
    Ok(())
}
