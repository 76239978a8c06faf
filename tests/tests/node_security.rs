//! What a hostile pod author cannot make a node do, tried from the pod spec on the real control
//! plane (kube-apiserver, kube-scheduler, kube-controller-manager, etcd):
//! - name a host file as its image: `file://` paths, absolute and relative paths are refused
//!   before any file is opened (InvalidImageName, an Event saying the node takes registry
//!   references only), so neither a text file's content nor a `.wasm` elsewhere on the host is
//!   read, shown or served; with `--allow-local-images DIR` only files beneath DIR run, and a
//!   link or `..` out of DIR is refused;
//! - hold the node's descriptors with slow clients: thousands of idle and half-sent
//!   connections to a WAGI pod and to the kubelet API (never finishing a TLS handshake) leave
//!   `/hello` and `kubectl logs` answering, and the agent's open descriptors bounded by the
//!   connection caps;
//! - turn a configMap or secret volume against the host: they are read-only to the guest even
//!   when the mount says `readOnly: false` (writes and new files are refused, the content stays
//!   the API's), secrets are written 0600 on tmpfs, and deleting the pod removes them;
//! - turn requests to the kubelet API into a flood on the API server: 200 requests with one
//!   bearer token cost one TokenReview and one SubjectAccessReview (the kubelet's caches),
//!   counted by the API server's own metrics;
//! - leave things behind by force-deleting (grace 0): a serving WAGI pod and a finished WASI
//!   pod lose their listener, log folder and volumes as on a graceful delete;
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_security`

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, hello_pod};
use e2e::cluster::Cluster;
use e2e::guests::guest;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get, listening};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(90);

/// `hello_pod` bound to `node` directly (two agents share the cluster).
fn pod_on(node: &str, name: &str, addr: &str, image: &str) -> Value {
    let mut pod = hello_pod(name, addr, image);
    pod["spec"]["nodeName"] = node.into();
    pod
}

/// The waiting reason of the pod's first container, once it has one.
fn waiting_reason(cluster: &Cluster, name: &str) -> Result<Option<String>> {
    let p = cluster.pod(name)?;
    Ok(
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            .as_str()
            .map(String::from),
    )
}

#[test]
fn pods_cannot_name_host_files_as_images() -> Result<()> {
    let host = tempfile::tempdir()?;
    let secret = host.path().join("host-secret.txt");
    std::fs::write(&secret, "TOP-SECRET-FIRST-LINE 4f1c\nsecond line\n")?;
    // A real module elsewhere on the host, and the operator's allowed folder.
    let outside = host.path().join("outside.wasm");
    std::fs::copy(guest("hello")?, &outside)?;
    let allowed = host.path().join("allowed");
    std::fs::create_dir(&allowed)?;
    std::fs::copy(guest("hello")?, allowed.join("hello.wasm"))?;
    std::os::unix::fs::symlink(&outside, allowed.join("link-out.wasm"))?;
    std::os::unix::fs::symlink(&secret, allowed.join("secret.wasm"))?;

    let cluster = Cluster::up()?;
    let strict = Agent::start_ready(&cluster, AgentOptions::new("wasi-strict"), TIMEOUT)?;
    let opted = Agent::start_ready(
        &cluster,
        AgentOptions::new("wasi-opted")
            .args(&["--allow-local-images", allowed.to_str().context("path")?]),
        TIMEOUT,
    )?;
    let out = || format!("{}\n{}", strict.output(), opted.output());

    // Node mode's default: no local form at all, whatever the file.
    let secret_uri = format!("file://{}", secret.display());
    let outside_uri = format!("file://{}", outside.display());
    let mut refused = vec![];
    for (name, image) in [
        ("file-uri-text", secret_uri.as_str()),
        ("abs-path-text", secret.to_str().context("path")?),
        ("proc-environ", "/proc/self/environ"),
        ("relative-wasm", "./outside.wasm"),
        ("host-wasm", outside_uri.as_str()),
    ] {
        let addr = format!("127.0.0.1:{}", free_port());
        cluster.apply(&pod_on("wasi-strict", name, &addr, image))?;
        refused.push((name, addr));
    }
    // With --allow-local-images: beneath the folder runs; a way out of it does not.
    let good_addr = format!("127.0.0.1:{}", free_port());
    let inside = format!("file://{}", allowed.join("hello.wasm").display());
    cluster.apply(&pod_on("wasi-opted", "allowed-wasm", &good_addr, &inside))?;
    let mut escapes = vec![];
    for (name, image) in [
        (
            "link-out",
            format!("file://{}", allowed.join("link-out.wasm").display()),
        ),
        (
            "link-to-text",
            format!("file://{}", allowed.join("secret.wasm").display()),
        ),
        ("dot-dot", format!("{}/../outside.wasm", allowed.display())),
        ("elsewhere", outside_uri.clone()),
    ] {
        let addr = format!("127.0.0.1:{}", free_port());
        cluster.apply(&pod_on("wasi-opted", name, &addr, &image))?;
        escapes.push((name, addr));
    }

    for (name, _) in refused.iter().chain(&escapes) {
        cluster
            .wait_for(&format!("{name} InvalidImageName"), TIMEOUT, || {
                Ok(waiting_reason(&cluster, name)?.as_deref() == Some("InvalidImageName"))
            })
            .with_context(out)?;
        let describe = cluster.describe_pod(name)?;
        ensure!(
            !describe.contains("TOP-SECRET") && !describe.contains("second line"),
            "the host file's content reached `kubectl describe pod {name}`:\n{describe}"
        );
        ensure!(
            cluster.pod(name)?["status"]["phase"] == "Failed",
            "{name} is not Failed"
        );
    }
    for (name, _) in &refused {
        let events = cluster.pod_events(name)?;
        ensure!(
            events
                .iter()
                .any(|(_, _, m)| m.contains("registry references only")),
            "no Event of {name} says the node takes registry references only: {events:?}"
        );
    }
    for (name, _) in &escapes {
        let events = cluster.pod_events(name)?;
        ensure!(
            events
                .iter()
                .any(|(_, _, m)| m.contains("--allow-local-images")),
            "no Event of {name} names --allow-local-images: {events:?}"
        );
    }
    // Nothing refused serves: its port was never bound.
    for (name, addr) in refused.iter().chain(&escapes) {
        ensure!(!listening(addr), "{name} listens on {addr}");
    }
    cluster
        .wait_for("allowed-wasm answers", TIMEOUT, || {
            Ok(get(&good_addr, "/hello").is_ok_and(|r| r.status == 200))
        })
        .with_context(out)?;
    let body = get(&good_addr, "/hello")?.body;
    ensure!(body.contains("hello world"), "allowed-wasm said {body:?}");
    cluster.down()
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn slow_and_idle_clients_cannot_exhaust_the_node() -> Result<()> {
    const CAP: usize = 200;
    let registry = Registry::start();
    let hello = registry.push_guest("hello")?;
    let log = registry.push_guest("log")?;
    let cluster = Cluster::up()?;
    // A long header timeout: what bounds the descriptors here is the cap, not the clock.
    let agent = Agent::start_ready(
        &cluster,
        AgentOptions::new("wasi-slowloris").args(&[
            "--max-connections-per-pod",
            &CAP.to_string(),
            "--header-timeout",
            "5m",
        ]),
        TIMEOUT,
    )?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut pod = hello_pod("target", &addr, &hello);
    pod["metadata"]["annotations"]["alpha.wagi.krustlet.dev/modules"] =
        r#"{"hello": {"route": "/hello"}, "log": {"route": "/log"}}"#.into();
    pod["spec"]["containers"] = serde_json::json!([
        {"name": "hello", "image": hello},
        {"name": "log", "image": log},
    ]);
    cluster.apply(&pod)?;
    cluster
        .wait_for("target answers", TIMEOUT, || {
            Ok(get(&addr, "/hello").is_ok_and(|r| r.status == 200))
        })
        .with_context(|| agent.output())?;
    ensure!(get(&addr, "/log")?.status == 200, "/log failed");
    let pid = agent.pid().context("agent pid")?;
    let baseline = open_fds(pid)?;

    // The attack: idle sockets and half-sent heads to the pod, silent sockets to the kubelet API.
    let kubelet = format!("127.0.0.1:{}", agent.port);
    let mut held = Vec::new();
    for i in 0..3000 {
        let target = if i % 3 == 2 { &kubelet } else { &addr };
        let Ok(mut s) = TcpStream::connect(target) else {
            continue;
        };
        if i % 3 == 1 {
            let _ = s.write_all(b"GET /hello HTTP/1.1\r\nHost: victim\r\nX-Slow: ");
        }
        held.push(s);
    }
    ensure!(
        held.len() > 2500,
        "only {} attack connections opened",
        held.len()
    );

    // Users are still served, and the agent holds no more than its caps.
    for _ in 0..5 {
        let r = get(&addr, "/hello")?;
        ensure!(
            r.status == 200 && r.body.contains("hello world"),
            "/hello under attack: {} {:?}",
            r.status,
            r.body
        );
    }
    let logs = cluster.kubectl(&["logs", "target", "-c", "log", "-n", "default"])?;
    ensure!(
        !logs.trim().is_empty(),
        "kubectl logs under attack returned nothing"
    );
    let fds = open_fds(pid)?;
    ensure!(
        fds <= baseline + 2 * CAP + 64,
        "the agent holds {fds} descriptors (baseline {baseline}, caps 2 x {CAP}) with {} attack connections open",
        held.len()
    );
    drop(held);
    cluster.down()
}

#[test]
fn config_and_secret_volumes_are_read_only_to_the_guest() -> Result<()> {
    let registry = Registry::start();
    let image = registry.push_guest("wasi_cmd")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-volumes"), TIMEOUT)?;
    cluster.apply(&serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default"},
        "data": {"file.txt": "from the API"}}))?;
    cluster.apply(&serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sec", "namespace": "default"},
        "stringData": {"token.txt": "s3cret"}}))?;
    cluster.apply(&serde_json::json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "writer", "namespace": "default"},
    "spec": {
        "nodeName": "wasi-volumes",
        "restartPolicy": "Never",
        "tolerations": serde_json::from_str::<Value>(e2e::agent::TOLERATIONS)?,
        "volumes": [
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "sec"}},
        ],
        "containers": [{"name": "job", "image": image,
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/cfg", "readOnly": false},
                {"name": "sec", "mountPath": "/secret", "readOnly": false},
            ],
            "env": [
                {"name": "WRITE_FILE", "value": "/cfg/file.txt,/cfg/planted.txt,/secret/token.txt"},
                {"name": "READ_FILE", "value": "/cfg/file.txt"},
            ]}]}}))?;
    cluster
        .wait_for("writer Succeeded", TIMEOUT, || {
            Ok(cluster.pod("writer")?["status"]["phase"] == "Succeeded")
        })
        .with_context(|| agent.output())?;
    let logs = cluster.kubectl(&["logs", "writer", "-n", "default"])?;
    for path in ["/cfg/file.txt", "/cfg/planted.txt", "/secret/token.txt"] {
        ensure!(
            logs.contains(&format!("write {path}: denied")),
            "the guest could write {path}:\n{logs}"
        );
    }
    ensure!(
        logs.contains("from the API") && !logs.contains("overwritten"),
        "the configMap's content changed:\n{logs}"
    );
    // Secrets: 0600, on tmpfs when the host has one, gone with the pod.
    let uid = cluster.pod("writer")?["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let on_shm: Vec<std::path::PathBuf> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join(&uid).join("sec/token.txt"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    let secret_file = match on_shm.first() {
        Some(p) => p.clone(),
        None => agent
            .data_dir
            .join("secrets")
            .join(&uid)
            .join("sec/token.txt"),
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret_file)
        .with_context(|| format!("no secret file at {}", secret_file.display()))?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "secret file mode {:o}", mode & 0o777);
    cluster.delete_pod("writer", TIMEOUT)?;
    cluster
        .wait_for("the secret volume removed", TIMEOUT, || {
            Ok(!secret_file.exists())
        })
        .with_context(|| agent.output())?;
    cluster.down()
}

#[test]
fn force_deleted_pods_leave_nothing_behind() -> Result<()> {
    let registry = Registry::start();
    let log = registry.push_guest("log")?;
    let cmd = registry.push_guest("wasi_cmd")?;
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-force"), TIMEOUT)?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut web = pod_on("wasi-force", "forced-web", &addr, &log);
    web["metadata"]["annotations"]["alpha.wagi.krustlet.dev/modules"] =
        r#"{"hello": {"route": "/log"}}"#.into();
    web["spec"]["volumes"] = serde_json::json!([{"name": "scratch", "emptyDir": {}}]);
    web["spec"]["containers"][0]["volumeMounts"] =
        serde_json::json!([{"name": "scratch", "mountPath": "/scratch"}]);
    cluster.apply(&web)?;
    cluster.apply(&serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "forced-job", "namespace": "default"},
        "spec": {"nodeName": "wasi-force", "restartPolicy": "Never",
            "tolerations": serde_json::from_str::<Value>(e2e::agent::TOLERATIONS)?,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{"name": "job", "image": cmd,
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]}}))?;
    cluster
        .wait_for("forced-web answers", TIMEOUT, || {
            Ok(get(&addr, "/log").is_ok_and(|r| r.status == 200))
        })
        .with_context(|| agent.output())?;
    cluster
        .wait_for("forced-job Succeeded", TIMEOUT, || {
            Ok(cluster.pod("forced-job")?["status"]["phase"] == "Succeeded")
        })
        .with_context(|| agent.output())?;
    let mut leftovers = vec![];
    for name in ["forced-web", "forced-job"] {
        let uid = cluster.pod(name)?["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let logs = agent.data_dir.join(format!("logs/default_{name}_{uid}"));
        let volumes = agent.data_dir.join(format!("volumes/{uid}"));
        cluster
            .wait_for(&format!("{name}'s log and volume folders"), TIMEOUT, || {
                Ok(logs.exists() && volumes.exists())
            })
            .with_context(|| agent.output())?;
        leftovers.push((name, logs, volumes));
    }
    for (name, _, _) in &leftovers {
        cluster.kubectl(&[
            "delete",
            "pod",
            name,
            "-n",
            "default",
            "--grace-period=0",
            "--force",
        ])?;
    }
    for (name, logs, volumes) in &leftovers {
        cluster
            .wait_for(&format!("{name} cleaned up"), TIMEOUT, || {
                Ok(!logs.exists() && !volumes.exists())
            })
            .with_context(|| agent.output())?;
    }
    ensure!(!listening(&addr), "forced-web still listens on {addr}");
    cluster.down()
}

/// The API server's count of `create` requests for `resource` (its /metrics).
fn api_creates(cluster: &Cluster, resource: &str) -> Result<u64> {
    let metrics = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    let needle = format!("resource=\"{resource}\"");
    Ok(metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(&needle)
                && l.contains("verb=\"POST\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

#[test]
fn repeated_kubelet_api_requests_are_reviewed_once() -> Result<()> {
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, AgentOptions::new("wasi-reviews"), TIMEOUT)?;
    let token = cluster.kubectl(&["create", "token", "default", "-n", "default"])?;
    let url = format!(
        "https://127.0.0.1:{}/containerLogs/default/nobody/c",
        agent.port
    );
    let curl = |bearer: &str| -> Result<String> {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {bearer}"))
            .arg(&url)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let (reviews, accesses) = (
        api_creates(&cluster, "tokenreviews")?,
        api_creates(&cluster, "subjectaccessreviews")?,
    );
    for _ in 0..100 {
        // A service account without nodes/proxy: authenticated, then denied.
        let code = curl(token.trim())?;
        ensure!(
            code == "403",
            "valid token without nodes/proxy: HTTP {code}"
        );
        let code = curl("not-a-token")?;
        ensure!(code == "401", "invalid token: HTTP {code}");
    }
    let reviews = api_creates(&cluster, "tokenreviews")? - reviews;
    let accesses = api_creates(&cluster, "subjectaccessreviews")? - accesses;
    ensure!(
        reviews >= 1 && accesses >= 1,
        "the API server's metrics show no review at all ({reviews}, {accesses})"
    );
    ensure!(
        reviews <= 4 && accesses <= 2,
        "200 requests with two tokens cost {reviews} TokenReviews and {accesses} SubjectAccessReviews"
    );
    cluster.down()
}
