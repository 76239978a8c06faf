//! `wasinode node` when things go wrong, each on its own real control plane (kube-apiserver,
//! kube-scheduler, kube-controller-manager, etcd), asserting what a user sees with `kubectl` and
//! HTTP:
//! - two WAGI pods on one port: the second shows `PortInUse` with a message naming the address,
//!   and an Event; the first keeps serving. A port held by another process: the same;
//! - an image tag missing from the registry, and a registry nobody listens on: the pod waits with
//!   `ErrImagePull`, then `ImagePullBackOff`, the message names the reference, Events `Failed` and
//!   `BackOff`; a good pod on the node runs all the while; once the tag is pushed, the retried
//!   pull succeeds and the pod runs;
//! - a module that is not valid wasm: `CreateContainerError` saying so in `kubectl describe pod`;
//! - a `hostNetwork` pod with default-host `:PORT` listens on the node IP (here 127.0.0.2) only;
//! - `imagePullSecrets` against a registry with htpasswd auth: with the secret the pod runs,
//!   without it the status says unauthorized;
//! - deletion grace: a request in flight when `kubectl delete pod` runs still gets its 200, the
//!   listener stops accepting at once, the port is freed and the pod object goes;
//! - kube-apiserver stopped for 30 s: the agent keeps running and its pod keeps answering; when the
//!   server is back the Node is Ready, the Lease renews and a new pod runs;
//! - kill -9 and restart with the same data dir: the pod keeps its startTime and restartCount,
//!   `kubectl logs` still has the lines logged before, the route answers, one listener;
//! - `--max-pods 1`: the Node advertises it, and a pod bound beyond it is Failed `OutOfpods` with
//!   the kubelet's message and Event, while the first keeps serving.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_failures`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, hello_pod, node_ready, wagi_pod};
use e2e::cluster::Cluster;
use e2e::guests::guest;
use e2e::registry::{Registry, base64};
use e2e::wasinode::{free_port, get, listening, write_file};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A control plane, one Ready agent named `node`, and a registry for the guests (node mode
/// takes registry references only).
fn node(opts: AgentOptions) -> Result<(Cluster, Agent, Registry)> {
    let registry = Registry::start();
    registry.push_guest("hello")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, opts, TIMEOUT)?;
    Ok((cluster, agent, registry))
}

/// The STATUS column of `kubectl get pod <name>`.
fn status_column(cluster: &Cluster, name: &str) -> Result<String> {
    let table = cluster.kubectl(&["get", "pod", name, "-n", "default", "--no-headers"])?;
    Ok(table
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string())
}

/// The first container's waiting `(reason, message)`.
fn waiting(p: &Value) -> (String, String) {
    let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
    (
        w["reason"].as_str().unwrap_or_default().to_string(),
        w["message"].as_str().unwrap_or_default().to_string(),
    )
}

fn hello_answers(addr: &str) -> Result<()> {
    let resp = get(addr, "/hello")?;
    ensure!(
        (resp.status, resp.body.as_str()) == (200, "hello world\n"),
        "GET {addr}/hello: {resp:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn port_in_use_fails_only_the_pod_that_wants_it() -> Result<()> {
    let (cluster, agent, registry) = node(AgentOptions::new("wasi-clash"))?;
    let image = registry.push_guest("hello")?;
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("first", &addr, &image))?;
    cluster
        .wait_pod_running("first", TIMEOUT)
        .with_context(|| agent.output())?;
    hello_answers(&addr)?;

    // A second pod on the same default-host port.
    cluster.apply(&hello_pod("second", &addr, &image))?;
    port_in_use_shown(&cluster, "second", &addr).with_context(|| agent.output())?;
    hello_answers(&addr).context("the first pod after the clash")?;
    ensure!(
        status_column(&cluster, "first")? == "Running",
        "{}",
        cluster.kubectl(&["get", "pods"])?
    );

    // A port another process holds.
    let outside = TcpListener::bind("127.0.0.1:0")?;
    let held = outside.local_addr()?.to_string();
    cluster.apply(&hello_pod("third", &held, &image))?;
    port_in_use_shown(&cluster, "third", &held).with_context(|| agent.output())?;
    // The outside process still owns it: a connection reaches our listener.
    let _client = TcpStream::connect(&held)?;
    outside.set_nonblocking(false)?;
    let (_conn, _) = outside
        .accept()
        .context("the outside listener still accepts")?;
    hello_answers(&addr).context("the first pod at the end")?;
    ensure!(node_ready(&cluster, "wasi-clash")?, "the node stays Ready");
    eprintln!("{}", cluster.kubectl(&["get", "pods", "-o", "wide"])?);
    Ok(())
}

fn port_in_use_shown(cluster: &Cluster, pod: &str, addr: &str) -> Result<()> {
    cluster.wait_for(&format!("{pod} PortInUse"), TIMEOUT, || {
        Ok(status_column(cluster, pod)? == "PortInUse")
    })?;
    let p = cluster.pod(pod)?;
    ensure!(p["status"]["phase"] == "Failed", "{}", p["status"]);
    ensure!(p["status"]["reason"] == "PortInUse", "{}", p["status"]);
    let message = p["status"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains(addr) && message.contains("in use"),
        "status message {message:?}"
    );
    let (reason, cmsg) = waiting(&p);
    ensure!(
        reason == "PortInUse" && cmsg.contains(addr),
        "container waiting: {reason} {cmsg:?}"
    );
    let describe = cluster.describe_pod(pod)?;
    ensure!(
        describe.contains("PortInUse")
            && describe.to_lowercase().contains("address already in use"),
        "kubectl describe pod {pod}:\n{describe}"
    );
    cluster.wait_pod_event(pod, "Warning", "Failed", &[addr, "in use"], TIMEOUT)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `kubectl get pods -w` into a file, as a user watching would see the STATUS column change.
struct Watch {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl Watch {
    fn start(cluster: &Cluster) -> Result<Watch> {
        let out = tempfile::NamedTempFile::new()?;
        let child = Command::new(&cluster.kubectl_path)
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args(["get", "pods", "-n", "default", "-w", "--no-headers"])
            .stdin(Stdio::null())
            .stdout(out.reopen()?)
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Watch { child, out })
    }

    /// The STATUS values shown for `pod`, in order, repeats folded.
    fn statuses(&self, pod: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.out.path()).unwrap_or_default();
        let mut seen: Vec<String> = Vec::new();
        for line in text.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.first() == Some(&pod)
                && let Some(s) = cols.get(2)
                && seen.last().map(String::as_str) != Some(*s)
            {
                seen.push(s.to_string());
            }
        }
        seen
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn unpullable_images_wait_in_image_pull_back_off() -> Result<()> {
    let (cluster, agent, _guests) = node(AgentOptions::new("wasi-pull"))?;
    let registry = Registry::start();
    let push_dir = tempfile::tempdir()?;
    let good = registry.image("hello:v1");
    e2e::wasinode::push(&guest("hello")?, &good, push_dir.path(), &[])?;
    let missing = registry.image("hello:no-such-tag");
    let unreachable = format!("127.0.0.1:{}/hello:v1", free_port());
    let watch = Watch::start(&cluster)?;

    for (name, image) in [("missing-tag", &missing), ("no-registry", &unreachable)] {
        let addr = format!("127.0.0.1:{}", free_port());
        cluster.apply(&hello_pod(name, &addr, image))?;
    }
    let good_addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("pulls-fine", &good_addr, &good))?;

    for (name, image, cause) in [
        ("missing-tag", &missing, "not found"),
        ("no-registry", &unreachable, "unreachable"),
    ] {
        cluster
            .wait_for(
                &format!("{name}: ErrImagePull, then ImagePullBackOff"),
                TIMEOUT,
                || {
                    let seen = watch.statuses(name);
                    let err = seen.iter().position(|s| s == "ErrImagePull");
                    let back = seen.iter().rposition(|s| s == "ImagePullBackOff");
                    Ok(matches!((err, back), (Some(e), Some(b)) if e < b))
                },
            )
            .with_context(|| format!("seen: {:?}\n{}", watch.statuses(name), agent.output()))?;
        let p = cluster.pod(name)?;
        ensure!(p["status"]["phase"] == "Pending", "{name}: {}", p["status"]);
        let (reason, message) = waiting(&p);
        ensure!(
            matches!(reason.as_str(), "ErrImagePull" | "ImagePullBackOff")
                && message.contains(image),
            "{name}: waiting {reason}: {message:?}"
        );
        cluster.wait_pod_event(name, "Warning", "Failed", &[image, cause], TIMEOUT)?;
        cluster.wait_pod_event(name, "Normal", "BackOff", &[image], TIMEOUT)?;
        let describe = cluster.describe_pod(name)?;
        ensure!(
            describe.contains(image.as_str()) && describe.contains("ImagePull"),
            "kubectl describe pod {name}:\n{describe}"
        );
        eprintln!("{name}: STATUS went {:?}", watch.statuses(name));
    }
    cluster
        .wait_pod_running("pulls-fine", TIMEOUT)
        .with_context(|| agent.output())?;
    hello_answers(&good_addr)?;
    ensure!(node_ready(&cluster, "wasi-pull")?, "the node stays Ready");

    // The pull is retried after the back-off: once the tag exists, the pod runs.
    e2e::wasinode::push(&guest("hello")?, &missing, push_dir.path(), &[])?;
    cluster
        .wait_pod_running("missing-tag", TIMEOUT)
        .with_context(|| agent.output())?;
    eprintln!(
        "missing-tag: STATUS went {:?}",
        watch.statuses("missing-tag")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_module_that_is_not_wasm_is_reported() -> Result<()> {
    let (cluster, agent, registry) = node(AgentOptions::new("wasi-badwasm"))?;
    let dir = tempfile::tempdir()?;
    let mut junk = b"\0asm\x01\0\0\0".to_vec();
    junk.extend_from_slice(b"this is not a WebAssembly module");
    let path = dir.path().join("junk.wasm");
    std::fs::write(&path, &junk)?;
    let addr = format!("127.0.0.1:{}", free_port());
    let junk_image = registry.image("junk/not-wasm:v1");
    e2e::wasinode::push(&path, &junk_image, dir.path(), &[])?;
    cluster.apply(&hello_pod("not-wasm", &addr, &junk_image))?;
    cluster
        .wait_for("not-wasm CreateContainerError", TIMEOUT, || {
            Ok(status_column(&cluster, "not-wasm")? == "CreateContainerError")
        })
        .with_context(|| agent.output())?;
    let describe = cluster.describe_pod("not-wasm")?;
    ensure!(
        describe.contains("CreateContainerError") && describe.contains("not valid WebAssembly"),
        "kubectl describe pod not-wasm:\n{describe}"
    );
    cluster.wait_pod_event(
        "not-wasm",
        "Warning",
        "Failed",
        &["not valid WebAssembly"],
        TIMEOUT,
    )?;
    ensure!(!listening(&addr), "a pod that failed listens on {addr}");
    // The node still runs good pods.
    let good = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("good", &good, &registry.push_guest("hello")?))?;
    cluster.wait_pod_running("good", TIMEOUT)?;
    hello_answers(&good)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn host_network_pod_listens_on_the_node_ip() -> Result<()> {
    let (cluster, agent, registry) = node(AgentOptions::new("wasi-hostnet").ip("127.0.0.2"))?;
    let port = free_port();
    let mut pod = hello_pod(
        "hostnet",
        &format!(":{port}"),
        &registry.push_guest("hello")?,
    );
    pod["spec"]["hostNetwork"] = json!(true);
    cluster.apply(&pod)?;
    cluster
        .wait_pod_running("hostnet", TIMEOUT)
        .with_context(|| agent.output())?;
    hello_answers(&format!("127.0.0.2:{port}"))?;
    ensure!(
        !listening(&format!("127.0.0.1:{port}")),
        "a hostNetwork pod also listens on 127.0.0.1:{port}, not only on the node IP"
    );
    let p = cluster.pod("hostnet")?;
    ensure!(
        p["status"]["podIP"] == "127.0.0.2" && p["status"]["hostIP"] == "127.0.0.2",
        "{}",
        p["status"]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn image_pull_secrets_open_a_private_registry() -> Result<()> {
    let (cluster, agent, _guests) = node(AgentOptions::new("wasi-secret"))?;
    let registry = Registry::start_with_htpasswd("wasi", "s3cret");
    let push_dir = tempfile::tempdir()?;
    let docker = push_dir.path().join("docker");
    std::fs::create_dir_all(&docker)?;
    let auth = base64(b"wasi:s3cret");
    write_file(
        &docker,
        "config.json",
        &format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )?;
    let image = registry.image("private/hello:v1");
    e2e::wasinode::push(
        &guest("hello")?,
        &image,
        &push_dir.path().join("data"),
        &[("DOCKER_CONFIG", &docker)],
    )?;
    cluster.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        "-n",
        "default",
        &format!("--docker-server={}", registry.addr),
        "--docker-username=wasi",
        "--docker-password=s3cret",
    ])?;

    let without = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("no-secret", &without, &image))?;
    let with = format!("127.0.0.1:{}", free_port());
    let mut pod = hello_pod("with-secret", &with, &image);
    pod["spec"]["imagePullSecrets"] = json!([{"name": "regcred"}]);
    cluster.apply(&pod)?;

    cluster
        .wait_pod_running("with-secret", TIMEOUT)
        .with_context(|| agent.output())?;
    hello_answers(&with)?;
    cluster
        .wait_for("no-secret waiting with unauthorized", TIMEOUT, || {
            let (reason, message) = waiting(&cluster.pod("no-secret")?);
            Ok(
                matches!(reason.as_str(), "ErrImagePull" | "ImagePullBackOff")
                    && message.contains("unauthorized"),
            )
        })
        .with_context(|| agent.output())?;
    let describe = cluster.describe_pod("no-secret")?;
    ensure!(
        describe.contains("unauthorized") && describe.contains(&registry.addr),
        "kubectl describe pod no-secret:\n{describe}"
    );
    ensure!(!listening(&without), "no-secret listens on {without}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn deletion_lets_the_request_in_flight_finish() -> Result<()> {
    let (cluster, agent, registry) = node(AgentOptions::new("wasi-grace"))?;
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&wagi_pod(
        "slow",
        &addr,
        r#"{"hello": {"route": "/echo"}}"#,
        &registry.push_guest("cgi_echo")?,
        true,
    ))?;
    cluster
        .wait_pod_running("slow", TIMEOUT)
        .with_context(|| agent.output())?;

    // A request whose body is still on its way: the module cannot run before it has all of it.
    let mut conn = TcpStream::connect(&addr)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.write_all(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 10\r\n\r\nhello"
        )
        .as_bytes(),
    )?;
    cluster.kubectl(&["delete", "pod", "slow", "-n", "default", "--wait=false"])?;
    // The listener stops accepting while the request is still in flight ...
    cluster.wait_for("the listener to stop accepting", TIMEOUT, || {
        Ok(!listening(&addr))
    })?;
    // ... and the pod object stays (Terminating) until it is answered.
    ensure!(
        cluster.pod_exists("slow")?,
        "the pod object went before its request in flight was answered"
    );
    conn.write_all(b"world")?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    ensure!(
        raw.starts_with("HTTP/1.1 200") && raw.contains("stdin=helloworld"),
        "the request in flight: {raw:?}\n{}",
        agent.output()
    );
    cluster
        .wait_for("the pod object to disappear", TIMEOUT, || {
            Ok(!cluster.pod_exists("slow")?)
        })
        .with_context(|| agent.output())?;
    ensure!(!listening(&addr), "{addr} listens after the delete");
    cluster.wait_pod_event("slow", "Normal", "Killing", &[], TIMEOUT)?;
    // The port is free: something else can bind it.
    TcpListener::bind(&addr).with_context(|| format!("binding {addr} after the delete"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// A node with pod `steady` Running, kube-apiserver stopped for 30 s and started again; all the
/// while `steady` answers every request and the agent keeps running. Returns the Lease's
/// renewTime from before the outage.
fn outage(name: &str) -> Result<(Cluster, Agent, Registry, String)> {
    let (cluster, mut agent, registry) = node(AgentOptions::new(name))?;
    let addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("steady", &addr, &registry.push_guest("hello")?))?;
    cluster
        .wait_pod_running("steady", TIMEOUT)
        .with_context(|| agent.output())?;

    // Requests all through the outage, from another thread.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, ok, addr) = (stop.clone(), ok.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get(&addr, "/hello") {
                    Ok(r) if r.status == 200 && r.body == "hello world\n" => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            failures
        })
    };
    let before = cluster.lease_renew_time(name)?;
    cluster.stop_component("kube-apiserver")?;
    ensure!(
        cluster.kubectl(&["get", "--raw", "/readyz"]).is_err(),
        "the API server still answers"
    );
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            agent.running(),
            "the agent exited during the outage:\n{}",
            agent.output()
        );
    }
    cluster.start_component("kube-apiserver")?;
    eprintln!("outage: kube-apiserver ready again");
    stop.store(true, Ordering::Relaxed);
    let failures = prober.join().unwrap_or_default();
    let answered = ok.load(Ordering::Relaxed);
    ensure!(
        failures.is_empty() && answered > 0,
        "requests failed during the outage ({answered} answered): {failures:?}"
    );
    eprintln!("outage: {answered} requests answered 200 while kube-apiserver was down, 0 failed");
    hello_answers(&addr)?;
    Ok((cluster, agent, registry, before))
}

#[test]
fn api_server_outage_keeps_pods_serving() -> Result<()> {
    const NODE: &str = "wasi-outage";
    let (cluster, mut agent, registry, before) = outage(NODE)?;
    cluster
        .wait_for("the Lease to renew after the outage", TIMEOUT, || {
            Ok(cluster.lease_renew_time(NODE)? > before)
        })
        .with_context(|| agent.output())?;
    // The pod watch caught up: a pod bound to the node after the outage runs. Bound directly
    // (spec.nodeName), not by kube-scheduler: when the node controller marked the Node Unknown
    // during the outage it is tainted unreachable:NoSchedule until the agent posts Ready again
    // (see node_is_ready_again_after_an_api_server_outage).
    let addr = format!("127.0.0.1:{}", free_port());
    let mut pod = hello_pod("after-outage", &addr, &registry.push_guest("hello")?);
    pod["spec"]["nodeName"] = json!(NODE);
    cluster.apply(&pod)?;
    cluster
        .wait_pod_running("after-outage", TIMEOUT)
        .with_context(|| {
            format!(
                "{}\n{}",
                cluster
                    .kubectl(&["get", "pods", "-o", "wide"])
                    .unwrap_or_default(),
                agent.output()
            )
        })?;
    hello_answers(&addr)?;
    ensure!(agent.running(), "the agent exited:\n{}", agent.output());
    Ok(())
}

/// After an outage the node lifecycle controller may mark the Node `Unknown` ("Kubelet stopped
/// posting node status") before the agent renews its Lease; the agent, as the kubelet, compares
/// the stored conditions with its own on its next check and posts Ready again.
#[test]
fn node_is_ready_again_after_an_api_server_outage() -> Result<()> {
    const NODE: &str = "wasi-outage-ready";
    let (cluster, mut agent, _guests, _) = outage(NODE)?;
    // Whether the node controller got to mark the Node Unknown before the agent renewed its
    // Lease is a race; make it certain, as the controller writes it. The patch's answer is the
    // Node as stored by it (reading it again would race with the agent, which may already have
    // written Ready back).
    let patched: Value = serde_json::from_str(&cluster.kubectl(&[
        "patch",
        "node",
        NODE,
        "--subresource=status",
        "--type=strategic",
        "-o",
        "json",
        "-p",
        r#"{"status": {"conditions": [{"type": "Ready", "status": "Unknown",
            "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status."}]}}"#,
    ])?)?;
    let ready = patched["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"].clone());
    ensure!(
        ready == Some(Value::from("Unknown")),
        "the patch did not store Ready=Unknown: {ready:?}"
    );
    agent.wait_ready(&cluster, TIMEOUT).with_context(|| {
        format!(
            "the Node Ready after the outage; node conditions: {}\n{}",
            cluster
                .kubectl_json(&["get", "node", NODE])
                .map(|n| n["status"]["conditions"].to_string())
                .unwrap_or_default(),
            agent.output()
        )
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Listening sockets on `port` (any address), as `ss` lists them.
fn listeners(port: u16) -> Result<usize> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

#[test]
fn killed_agent_readopts_its_pod() -> Result<()> {
    let (cluster, mut agent, registry) = node(AgentOptions::new("wasi-readopt"))?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    cluster.apply(&wagi_pod(
        "keeper",
        &addr,
        r#"{"hello": {"route": "/log"}}"#,
        &registry.push_guest("log")?,
        true,
    ))?;
    cluster
        .wait_pod_running("keeper", TIMEOUT)
        .with_context(|| agent.output())?;
    get(&addr, "/log?before")?;
    cluster.wait_for("the log line before the restart", TIMEOUT, || {
        Ok(cluster
            .kubectl(&["logs", "keeper", "-n", "default"])?
            .contains("query=before"))
    })?;
    let before = cluster.pod("keeper")?;

    agent.kill()?;
    ensure!(!listening(&addr), "{addr} still listens after kill -9");
    agent.restart()?;
    agent
        .wait_listening(&addr, TIMEOUT)
        .context("the re-adopted pod's listener")?;
    cluster
        .wait_pod_running("keeper", TIMEOUT)
        .with_context(|| agent.output())?;
    let resp = get(&addr, "/log?after")?;
    ensure!(resp.status == 200, "{resp:?}");
    ensure!(
        listeners(port)? == 1,
        "listeners on {port}: {}",
        listeners(port)?
    );

    let after = cluster.pod("keeper")?;
    ensure!(
        after["status"]["startTime"] == before["status"]["startTime"],
        "startTime {} -> {}",
        before["status"]["startTime"],
        after["status"]["startTime"]
    );
    let restarts = |p: &Value| p["status"]["containerStatuses"][0]["restartCount"].clone();
    ensure!(
        restarts(&after) == restarts(&before),
        "restartCount {} -> {}",
        restarts(&before),
        restarts(&after)
    );
    ensure!(
        after["metadata"]["uid"] == before["metadata"]["uid"],
        "the pod was replaced"
    );
    cluster
        .wait_for("kubectl logs with lines from both runs", TIMEOUT, || {
            let logs = cluster.kubectl(&["logs", "keeper", "-n", "default"])?;
            Ok(logs.contains("query=before") && logs.contains("query=after"))
        })
        .with_context(|| agent.output())?;
    eprintln!(
        "{}",
        cluster.kubectl(&["get", "pod", "keeper", "-o", "wide"])?
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_pod_beyond_max_pods_is_rejected_as_out_of_pods() -> Result<()> {
    let (cluster, agent, registry) =
        node(AgentOptions::new("wasi-full").args(&["--max-pods", "1"]))?;
    let node = cluster.kubectl_json(&["get", "node", "wasi-full"])?;
    ensure!(
        node["status"]["capacity"]["pods"] == "1" && node["status"]["allocatable"]["pods"] == "1",
        "the Node advertises --max-pods: {}",
        node["status"]
    );
    let first = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("first", &first, &registry.push_guest("hello")?))?;
    cluster
        .wait_pod_running("first", TIMEOUT)
        .with_context(|| agent.output())?;
    // Bound directly (the scheduler would keep it Pending): the node's admission rejects it.
    let second = format!("127.0.0.1:{}", free_port());
    let mut pod = hello_pod("second", &second, &registry.push_guest("hello")?);
    pod["spec"]["nodeName"] = json!("wasi-full");
    cluster.apply(&pod)?;
    cluster
        .wait_for("second Failed with OutOfpods", TIMEOUT, || {
            let p = cluster.pod("second")?;
            Ok(p["status"]["phase"] == "Failed" && p["status"]["reason"] == "OutOfpods")
        })
        .with_context(|| agent.output())?;
    ensure!(status_column(&cluster, "second")? == "OutOfpods");
    let p = cluster.pod("second")?;
    let message = p["status"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("pods, requested: 1, used: 1, capacity: 1"),
        "{message}"
    );
    cluster.wait_pod_event("second", "Warning", "OutOfpods", &["capacity: 1"], TIMEOUT)?;
    ensure!(!listening(&second), "a rejected pod listens on {second}");
    hello_answers(&first)?;
    ensure!(node_ready(&cluster, "wasi-full")?, "the node stays Ready");
    // Room again once the first pod is gone.
    cluster.kubectl(&["delete", "pod", "first", "--wait=true", "--timeout=60s"])?;
    let third = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod("third", &third, &registry.push_guest("hello")?))?;
    cluster
        .wait_pod_running("third", TIMEOUT)
        .with_context(|| agent.output())?;
    hello_answers(&third)?;
    Ok(())
}
