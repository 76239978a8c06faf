//! Probes on `wasinode node`, on the real control plane (kube-apiserver, kube-scheduler,
//! kube-controller-manager, etcd), asserting what a user sees with `kubectl` and HTTP. The
//! guest `health` answers 500 on `/.../<name>` while the file `<name>.fail` exists in the
//! hostPath volume the test owns, so the test switches a container's health with a file:
//! - a readiness probe: the pod starts unready (READY 0/1, Ready False with the kubelet's
//!   message), turns 1/1 when the probe passes and 0/1 again when it fails;
//! - a startup probe gates readiness: the pod stays unready (`started` false) while it fails,
//!   even though its readiness path passes;
//! - a liveness probe that fails restarts the container: restartCount goes up, the last state
//!   is terminated, Events `Unhealthy` (with the probe's message) and `Killing` ("Container X
//!   failed liveness probe, will be restarted"), and the pod serves again after the restart;
//! - tcpSocket (port by containerPort name) and grpc (`grpc.health.v1.Health/Check` over h2c
//!   to the http-hello component) probes pass and fail as their targets say;
//! - an exec probe: a Warning Event and the Ready condition's message say that exec probes
//!   cannot run on a WebAssembly node, and the container stays unready.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_probes`

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A pod for the seed's WASI nodes, scheduled by kube-scheduler, with `spec` merged in.
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

/// A WAGI pod serving `health` on `/...` at `addr`, its volume `state` (the hostPath `dir`) at
/// `/state`, with `probes` merged into its container.
fn health_pod(name: &str, addr: &str, image: &str, dir: &Path, probes: Value) -> Value {
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let mut container = json!({
        "name": "hello",
        "image": image,
        "ports": [{"name": "http", "containerPort": port}],
        "volumeMounts": [{"name": "state", "mountPath": "/state"}],
    });
    if let (Some(dst), Some(src)) = (container.as_object_mut(), probes.as_object()) {
        for (k, v) in src {
            dst.insert(k.clone(), v.clone());
        }
    }
    pod(
        name,
        json!({
            "alpha.wagi.krustlet.dev/default-host": addr,
            "alpha.wagi.krustlet.dev/modules": r#"{"hello": {"route": "/..."}}"#,
        }),
        json!({
            "containers": [container],
            "volumes": [{"name": "state", "hostPath": {"path": dir.to_string_lossy()}}],
        }),
    )
}

/// An httpGet probe of `path` on the container's port named `http`, every second.
fn http_probe(path: &str, failure_threshold: u32) -> Value {
    json!({
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": 1,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    })
}

fn condition<'a>(p: &'a Value, type_: &str) -> Option<&'a Value> {
    p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn is_ready(p: &Value) -> bool {
    condition(p, "Ready").is_some_and(|c| c["status"] == "True")
}

/// The READY column of `kubectl get pod <name>` (`0/1`, `1/1`).
fn ready_column(cluster: &Cluster, name: &str) -> Result<String> {
    let table = cluster.kubectl(&["get", "pod", name, "-n", "default", "--no-headers"])?;
    Ok(table
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string())
}

fn wait_ready_column(cluster: &Cluster, name: &str, want: &str) -> Result<()> {
    cluster.wait_for(
        &format!("kubectl get pod {name} showing READY {want}"),
        TIMEOUT,
        || Ok(ready_column(cluster, name)? == want),
    )
}

fn wait_running(cluster: &Cluster, name: &str) -> Result<()> {
    cluster.wait_for(&format!("{name} Running"), TIMEOUT, || {
        let p = cluster.pod(name)?;
        Ok(p["status"]["phase"] == "Running"
            && p["status"]["containerStatuses"][0]["state"]["running"].is_object())
    })
}

/// The `count` of the pod's Event with `reason` whose message contains `words`.
fn event_count(cluster: &Cluster, pod: &str, reason: &str, words: &str) -> Result<i64> {
    Ok(cluster
        .pod_event_items(pod)?
        .iter()
        .filter(|e| {
            e["reason"] == reason && e["message"].as_str().is_some_and(|m| m.contains(words))
        })
        .filter_map(|e| e["count"].as_i64())
        .sum())
}

fn restart_count(p: &Value) -> i64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_i64()
        .unwrap_or(-1)
}

fn touch(dir: &Path, name: &str) -> Result<()> {
    std::fs::write(dir.join(name), b"")?;
    Ok(())
}

fn rm(dir: &Path, name: &str) -> Result<()> {
    std::fs::remove_file(dir.join(name))?;
    Ok(())
}

/// A control plane, one Ready agent (restart back-off 1 s), and a registry holding `health`.
fn node(name: &str) -> Result<(Registry, Cluster, Agent, String)> {
    let registry = Registry::start();
    let image = registry.push_guest("health")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(
        &cluster,
        AgentOptions::new(name).args(&["--restart-backoff", "1s"]),
        TIMEOUT,
    )?;
    Ok((registry, cluster, agent, image))
}

#[test]
fn readiness_startup_and_liveness_probes_drive_a_wagi_pod() -> Result<()> {
    let (_registry, cluster, agent, image) = node("wasm-probes")?;
    let state = tempfile::tempdir()?;
    let dir = state.path();

    readiness_flips_ready(&cluster, &image, dir).with_context(|| agent.output())?;
    startup_gates_readiness(&cluster, &image, dir).with_context(|| agent.output())?;
    liveness_restarts_the_container(&cluster, &image, dir).with_context(|| agent.output())?;

    // A deleted pod's probes stop with it: its liveness path fails again, yet once it is
    // deleted no Unhealthy or Killing Event about it appears while five more attempts of
    // another pod's probe go by (the clock of this check).
    touch(dir, "live.fail")?;
    cluster.wait_pod_event(
        "live",
        "Warning",
        "Unhealthy",
        &["Liveness probe failed"],
        TIMEOUT,
    )?;
    cluster.delete_pod("live", TIMEOUT)?;
    let count = |reason: &str, words: &str| event_count(&cluster, "live", reason, words);
    let before = (
        count("Unhealthy", "Liveness")?,
        count("Killing", "liveness")?,
    );
    touch(dir, "ready.fail")?;
    let clock = event_count(&cluster, "ready-flip", "Unhealthy", "Readiness")?;
    cluster.wait_for(
        "five more readiness attempts of ready-flip",
        TIMEOUT,
        || Ok(event_count(&cluster, "ready-flip", "Unhealthy", "Readiness")? >= clock + 5),
    )?;
    let after = (
        count("Unhealthy", "Liveness")?,
        count("Killing", "liveness")?,
    );
    ensure!(
        before == after,
        "the deleted pod was still probed: {before:?} -> {after:?}"
    );
    for name in ["ready-flip", "slow-start"] {
        cluster.delete_pod(name, TIMEOUT)?;
    }
    Ok(())
}

/// READY 0/1 while the readiness path fails (the container starts unready), 1/1 when it passes,
/// 0/1 when it fails again; the route keeps serving throughout (readiness is not liveness).
fn readiness_flips_ready(cluster: &Cluster, image: &str, dir: &Path) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    touch(dir, "ready.fail")?;
    cluster.apply(&health_pod(
        "ready-flip",
        &addr,
        image,
        dir,
        json!({"readinessProbe": http_probe("/ready", 1)}),
    ))?;
    wait_running(cluster, "ready-flip")?;
    cluster.wait_pod_event(
        "ready-flip",
        "Warning",
        "Unhealthy",
        &["Readiness probe failed: HTTP probe failed with statuscode: 500"],
        TIMEOUT,
    )?;
    ensure!(ready_column(cluster, "ready-flip")? == "0/1");
    let p = cluster.pod("ready-flip")?;
    let ready = condition(&p, "Ready").cloned().unwrap_or_default();
    ensure!(
        ready["status"] == "False"
            && ready["reason"] == "ContainersNotReady"
            && ready["message"] == "containers with unready status: [hello]",
        "Ready condition: {ready}"
    );
    ensure!(
        p["status"]["containerStatuses"][0]["ready"] == false
            && p["status"]["containerStatuses"][0]["started"] == true,
        "{}",
        p["status"]["containerStatuses"]
    );
    // Unready, and still serving.
    let r = get(&addr, "/hello")?;
    ensure!(r.status == 200, "GET /hello of an unready pod: {r:?}");

    rm(dir, "ready.fail")?;
    wait_ready_column(cluster, "ready-flip", "1/1")?;
    let p = cluster.pod("ready-flip")?;
    ensure!(
        condition(&p, "ContainersReady").is_some_and(|c| c["status"] == "True")
            && p["status"]["containerStatuses"][0]["ready"] == true,
        "{}",
        p["status"]
    );

    touch(dir, "ready.fail")?;
    wait_ready_column(cluster, "ready-flip", "0/1")?;
    ensure!(restart_count(&cluster.pod("ready-flip")?) == 0);
    rm(dir, "ready.fail")?;
    wait_ready_column(cluster, "ready-flip", "1/1")
}

/// While the startup probe fails, the container is not `started` and the readiness probe does
/// not run (its path passes, yet the pod stays 0/1); once startup passes, the pod is ready.
fn startup_gates_readiness(cluster: &Cluster, image: &str, dir: &Path) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    touch(dir, "started.fail")?;
    cluster.apply(&health_pod(
        "slow-start",
        &addr,
        image,
        dir,
        json!({
            "startupProbe": http_probe("/started", 1000),
            "readinessProbe": http_probe("/up", 1),
        }),
    ))?;
    wait_running(cluster, "slow-start")?;
    cluster.wait_pod_event(
        "slow-start",
        "Warning",
        "Unhealthy",
        &["Startup probe failed: HTTP probe failed with statuscode: 500"],
        TIMEOUT,
    )?;
    // Three failed startup attempts (the Event's count): the pod stays unready, not started.
    cluster.wait_for("three failed startup attempts", TIMEOUT, || {
        Ok(event_count(cluster, "slow-start", "Unhealthy", "Startup probe failed")? >= 3)
    })?;
    let p = cluster.pod("slow-start")?;
    ensure!(
        !is_ready(&p)
            && p["status"]["containerStatuses"][0]["started"] == false
            && ready_column(cluster, "slow-start")? == "0/1",
        "{}",
        p["status"]
    );
    ensure!(
        get(&addr, "/up")?.status == 200,
        "the readiness path passes all along"
    );

    rm(dir, "started.fail")?;
    wait_ready_column(cluster, "slow-start", "1/1")?;
    let p = cluster.pod("slow-start")?;
    ensure!(
        p["status"]["containerStatuses"][0]["started"] == true && restart_count(&p) == 0,
        "{}",
        p["status"]
    );
    Ok(())
}

/// A failing liveness probe restarts the container: restartCount up, the last state terminated,
/// `Unhealthy` and `Killing` Events, back-off, and the pod serves again after the restart.
fn liveness_restarts_the_container(cluster: &Cluster, image: &str, dir: &Path) -> Result<()> {
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&health_pod(
        "live",
        &addr,
        image,
        dir,
        json!({"livenessProbe": http_probe("/live", 2)}),
    ))?;
    wait_ready_column(cluster, "live", "1/1")?;
    ensure!(restart_count(&cluster.pod("live")?) == 0);

    touch(dir, "live.fail")?;
    cluster.wait_pod_event(
        "live",
        "Warning",
        "Unhealthy",
        &["Liveness probe failed: HTTP probe failed with statuscode: 500"],
        TIMEOUT,
    )?;
    cluster.wait_pod_event(
        "live",
        "Normal",
        "Killing",
        &["Container hello failed liveness probe, will be restarted"],
        TIMEOUT,
    )?;
    cluster.wait_for("restartCount 1", TIMEOUT, || {
        Ok(restart_count(&cluster.pod("live")?) >= 1)
    })?;
    rm(dir, "live.fail")?;
    cluster.wait_for("live Ready after its restart", TIMEOUT, || {
        let p = cluster.pod("live")?;
        Ok(is_ready(&p) && restart_count(&p) >= 1)
    })?;
    let p = cluster.pod("live")?;
    let last = &p["status"]["containerStatuses"][0]["lastState"]["terminated"];
    ensure!(
        last["exitCode"] == 137
            && last["message"]
                .as_str()
                .is_some_and(|m| m.contains("failed liveness probe")),
        "lastState: {last}"
    );
    cluster.wait_pod_event(
        "live",
        "Warning",
        "BackOff",
        &["restarting failed container hello"],
        TIMEOUT,
    )?;
    let r = get(&addr, "/live")?;
    ensure!(
        (r.status, r.body.as_str()) == (200, "ok: live\n"),
        "after the restart: {r:?}"
    );
    Ok(())
}

#[test]
fn tcp_grpc_and_exec_probes() -> Result<()> {
    let (registry, cluster, agent, image) = node("wasm-probe-kinds")?;
    let component = registry.push_component("http-hello")?;
    let state = tempfile::tempdir()?;
    let dir = state.path();

    // tcpSocket on the container's port by name: the listener accepts, so the pod is ready;
    // one on a port nobody listens on keeps its pod unready.
    let addr = format!("127.0.0.1:{}", free_port());
    let tcp =
        |port: Value| json!({"readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1}});
    cluster.apply(&health_pod(
        "tcp-up",
        &addr,
        &image,
        dir,
        tcp(json!("http")),
    ))?;
    let closed = free_port();
    let addr2 = format!("127.0.0.1:{}", free_port());
    cluster.apply(&health_pod(
        "tcp-down",
        &addr2,
        &image,
        dir,
        tcp(json!(closed)),
    ))?;
    wait_ready_column(&cluster, "tcp-up", "1/1").with_context(|| agent.output())?;
    cluster.wait_pod_event(
        "tcp-down",
        "Warning",
        "Unhealthy",
        // A port the pod does not serve is not dialled at all (it may be a host service's).
        &[
            "Readiness probe failed",
            &format!("port {closed} is not served by this pod"),
        ],
        TIMEOUT,
    )?;
    ensure!(ready_column(&cluster, "tcp-down")? == "0/1");

    // grpc: grpc.health.v1.Health/Check over h2c to the component's port; SERVING for the
    // server, NOT_SERVING for the service "down".
    let grpc_pod = |name: &str, port: u16, service: Option<&str>| {
        let mut probe = json!({"grpc": {"port": port}, "periodSeconds": 1});
        if let Some(s) = service {
            probe["grpc"]["service"] = json!(s);
        }
        pod(
            name,
            json!({}),
            json!({"containers": [{
                "name": "web",
                "image": component,
                "ports": [{"containerPort": port}],
                "readinessProbe": probe,
            }]}),
        )
    };
    let (p1, p2) = (free_port(), free_port());
    cluster.apply(&grpc_pod("grpc-up", p1, None))?;
    cluster.apply(&grpc_pod("grpc-down", p2, Some("down")))?;
    wait_ready_column(&cluster, "grpc-up", "1/1").with_context(|| agent.output())?;
    cluster.wait_pod_event(
        "grpc-down",
        "Warning",
        "Unhealthy",
        &["Readiness probe failed: service unhealthy (responded with \"NOT_SERVING\")"],
        TIMEOUT,
    )?;
    ensure!(ready_column(&cluster, "grpc-down")? == "0/1");

    // grpc liveness on a component: NOT_SERVING restarts it under restartPolicy Always (its
    // listener re-made: it serves again), and kills it for good under Never (the pod fails).
    let live_pod = |name: &str, port: u16, policy: &str| {
        let mut p = grpc_pod(name, port, None);
        p["spec"]["restartPolicy"] = json!(policy);
        p["spec"]["containers"][0]
            .as_object_mut()
            .map(|c| c.remove("readinessProbe"));
        p["spec"]["containers"][0]["livenessProbe"] = json!({
            "grpc": {"port": port, "service": "down"},
            "periodSeconds": 1,
            "failureThreshold": 1,
        });
        p
    };
    let (p3, p4) = (free_port(), free_port());
    cluster.apply(&live_pod("grpc-live", p3, "Always"))?;
    cluster.apply(&live_pod("grpc-never", p4, "Never"))?;
    cluster.wait_pod_event(
        "grpc-live",
        "Normal",
        "Killing",
        &["Container web failed liveness probe, will be restarted"],
        TIMEOUT,
    )?;
    cluster
        .wait_for("grpc-live restarted and serving", TIMEOUT, || {
            let p = cluster.pod("grpc-live")?;
            Ok(restart_count(&p) >= 1
                && p["status"]["containerStatuses"][0]["state"]["running"].is_object()
                && get(&format!("127.0.0.1:{p3}"), "/env?HOSTNAME").is_ok_and(|r| r.status < 500))
        })
        .with_context(|| agent.output())?;
    cluster.wait_for("grpc-never Failed", TIMEOUT, || {
        Ok(cluster.pod("grpc-never")?["status"]["phase"] == "Failed")
    })?;
    let p = cluster.pod("grpc-never")?;
    let c = &p["status"]["containerStatuses"][0];
    ensure!(
        c["restartCount"] == 0 && c["state"]["terminated"]["exitCode"] == 137,
        "{c}"
    );
    ensure!(
        !e2e::wasinode::listening(&format!("127.0.0.1:{p4}")),
        "the killed container's port still accepts"
    );

    // A command container (it listens on nothing) whose liveness probe fails is killed and
    // run again: restartCount up, last state terminated 137.
    let cmd = registry.push_guest("wasi_cmd")?;
    cluster.apply(&pod(
        "cmd-live",
        json!({}),
        json!({"containers": [{
            "name": "main",
            "image": cmd,
            "env": [{"name": "SLEEP_MS", "value": "600000"}],
            "livenessProbe": {
                "tcpSocket": {"port": free_port()},
                "periodSeconds": 1,
                "failureThreshold": 1,
            },
        }]}),
    ))?;
    cluster.wait_pod_event(
        "cmd-live",
        "Normal",
        "Killing",
        &["Container main failed liveness probe, will be restarted"],
        TIMEOUT,
    )?;
    cluster
        .wait_for("cmd-live restarted", TIMEOUT, || {
            let p = cluster.pod("cmd-live")?;
            let c = &p["status"]["containerStatuses"][0];
            Ok(restart_count(&p) >= 1 && c["lastState"]["terminated"]["exitCode"] == 137)
        })
        .with_context(|| agent.output())?;

    // exec: cannot run here; the pod says so and stays unready.
    let addr3 = format!("127.0.0.1:{}", free_port());
    cluster.apply(&health_pod(
        "exec",
        &addr3,
        &image,
        dir,
        json!({"readinessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]}, "periodSeconds": 1}}),
    ))?;
    wait_running(&cluster, "exec")?;
    cluster.wait_pod_event(
        "exec",
        "Warning",
        "ProbeNotSupported",
        &[
            "readinessProbe.exec",
            "exec probes cannot run on a WebAssembly node",
        ],
        TIMEOUT,
    )?;
    cluster.wait_pod_event(
        "exec",
        "Warning",
        "Unhealthy",
        &["Readiness probe failed: exec probes cannot run on a WebAssembly node"],
        TIMEOUT,
    )?;
    cluster.wait_for("the exec pod's Ready condition saying why", TIMEOUT, || {
        let p = cluster.pod("exec")?;
        Ok(condition(&p, "Ready").is_some_and(|c| {
            c["status"] == "False"
                && c["message"].as_str().is_some_and(|m| {
                    m.contains("[hello]")
                        && m.contains("exec probes cannot run on a WebAssembly node")
                })
        }))
    })?;
    ensure!(ready_column(&cluster, "exec")? == "0/1");
    ensure!(restart_count(&cluster.pod("exec")?) == 0);
    Ok(())
}

/// A pod author's probes cannot reach what the pod cannot: a host service on another address, or
/// a port of the pod's own address (here the node's, shared with the host) that the pod does not
/// serve. Such probes fail, the pod stays unready, an `Unhealthy` Event says why, and nothing
/// connects to the host service.
#[test]
fn probes_reach_only_their_own_pod() -> Result<()> {
    let (_registry, cluster, agent, image) = node("wasi-probe-fence")?;
    // Host services the agent (root) could reach: one on another loopback address, one on the
    // pod's own address (127.0.0.1, the node's) but a port the pod does not serve.
    let other = std::net::TcpListener::bind("127.0.0.2:0")?;
    let beside = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dir = tempfile::tempdir()?;
    let probe = |action: Value| {
        let mut p = action;
        p["periodSeconds"] = json!(1);
        json!({ "readinessProbe": p })
    };
    let cases = [
        (
            "fence-host",
            probe(json!({"tcpSocket": {"host": "127.0.0.2", "port": other.local_addr()?.port()}})),
            "is not the pod's address",
        ),
        (
            "fence-port",
            probe(json!({"httpGet": {"path": "/", "port": beside.local_addr()?.port()}})),
            "is not served by this pod",
        ),
        (
            "fence-localhost",
            probe(json!({"tcpSocket": {"host": "localhost", "port": beside.local_addr()?.port()}})),
            "is not served by this pod",
        ),
    ];
    for (name, probes, _) in &cases {
        let addr = format!("127.0.0.1:{}", free_port());
        cluster.apply(&health_pod(name, &addr, &image, dir.path(), probes.clone()))?;
    }
    for (name, _, why) in &cases {
        wait_running(&cluster, name).with_context(|| agent.output())?;
        cluster.wait_pod_event(name, "Warning", "Unhealthy", &[why], TIMEOUT)?;
        ensure!(
            ready_column(&cluster, name)? == "0/1",
            "{name} is Ready on a probe of a host service"
        );
    }
    for (what, l) in [("127.0.0.2", &other), ("the pod's address", &beside)] {
        l.set_nonblocking(true)?;
        match l.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => anyhow::bail!("a probe connected to the host service on {what}: {other:?}"),
        }
    }
    Ok(())
}
