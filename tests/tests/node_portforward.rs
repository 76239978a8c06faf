//! `kubectl port-forward`, `exec` and `/pods` against `wasinode node` on a real control plane
//! (kube-apiserver, kube-scheduler, kube-controller-manager, etcd), with the guests pushed to
//! the test registry:
//! - `kubectl port-forward pod/P :PORT` to a WAGI pod and to a wasi:http component pod serves
//!   real requests (the API server reaches the node's `/portForward` with SPDY/3.1, whether
//!   kubectl spoke WebSocket or SPDY to it), several connections through one forward, at once
//!   too; once kubectl is gone the node holds no connection to the pod;
//! - a forward to a port the pod does not serve fails with the reason, and kubectl exits;
//! - the kubelet's WebSocket protocol (`v4.channel.k8s.io`, as non-kubectl clients speak it)
//!   through the API server serves a request too;
//! - deleting the pod ends a running forward;
//! - `kubectl exec` and `kubectl attach` fail at once, saying why (a WebAssembly pod has no
//!   shell or TTY) and naming the pod;
//! - `/pods` through the API server's node proxy lists the node's pods;
//! - a caller without `nodes/proxy` gets 403 from `/portForward` and `/pods`.
//!
//! Run: `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test node_portforward`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS, hello_pod};
use e2e::cluster::Cluster;
use e2e::netns::NetNs;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const NODE: &str = "wasm-portforward";

/// A running `kubectl port-forward`: its local port, and what it printed.
struct Forward {
    child: Child,
    local: u16,
    output: Arc<Mutex<String>>,
    /// Pipes read to their end (2: kubectl's stdout and stderr).
    closed: Arc<AtomicUsize>,
}

impl Forward {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.local)
    }

    fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (bounded) for kubectl to exit; its output then.
    fn wait_exit(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait()?.is_some() {
                // The readers finish once the pipes close.
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until && self.closed.load(Ordering::Acquire) < 2 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(self.output());
            }
            if Instant::now() >= deadline {
                bail!(
                    "kubectl port-forward still running after {timeout:?}: {}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How kubectl reaches the API server.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// WebSocket (`SPDY/3.1+portforward.k8s.io`, kubectl's default), which the API server
    /// tunnels to the node as SPDY/3.1.
    WebSocket,
    /// SPDY/3.1 (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`), which the API server proxies as it is.
    Spdy,
}

/// Starts `kubectl port-forward <target> :<remote>` and waits for the local port it prints.
fn port_forward(cluster: &Cluster, target: &str, remote: u16) -> Result<Forward> {
    port_forward_via(cluster, target, remote, Via::WebSocket)
}

fn port_forward_via(cluster: &Cluster, target: &str, remote: u16, via: Via) -> Result<Forward> {
    let websockets = match via {
        Via::WebSocket => "true",
        Via::Spdy => "false",
    };
    let mut child = Command::new(&cluster.kubectl_path)
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args([
            "port-forward",
            "-n",
            "default",
            target,
            &format!(":{remote}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let output = Arc::new(Mutex::new(String::new()));
    let closed = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<u16>();
    let mut readers = 0;
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        readers += 1;
        let output = output.clone();
        let closed = closed.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                // "Forwarding from 127.0.0.1:41234 -> 3001"
                if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                    && let Some(port) = rest.split(' ').next().and_then(|p| p.parse().ok())
                {
                    let _ = tx.send(port);
                }
                let mut o = output.lock().unwrap_or_else(|p| p.into_inner());
                o.push_str(&line);
                o.push('\n');
            }
            closed.fetch_add(1, Ordering::Release);
        });
    }
    drop(tx);
    ensure!(readers == 2, "kubectl's pipes");
    let mut fwd = Forward {
        child,
        local: 0,
        output,
        closed,
    };
    fwd.local = rx.recv_timeout(TIMEOUT).with_context(|| {
        format!(
            "kubectl port-forward printed no local port: {}",
            fwd.output()
        )
    })?;
    Ok(fwd)
}

/// Established TCP connections on this host with `port` at either end (the agent's
/// connections to a pod's listener show up twice: both ends are local).
fn connections_on(port: u16) -> Result<usize> {
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" {
                continue;
            }
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port) {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Runs `kubectl args...` with a deadline; (success, stdout + stderr).
fn kubectl_bounded(cluster: &Cluster, args: &[&str], timeout: Duration) -> Result<(bool, String)> {
    let mut child = Command::new(&cluster.kubectl_path)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "kubectl {} still running after {timeout:?}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn curl_code(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
        ])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_ready(cluster: &Cluster, name: &str) -> Result<()> {
    cluster.wait_for(&format!("{name} Running and Ready"), TIMEOUT, || {
        let p = cluster.pod(name)?;
        Ok(p["status"]["phase"] == "Running"
            && p["status"]["containerStatuses"][0]["ready"] == true)
    })
}

/// Two requests on one connection (keep-alive), each answer read by its Content-Length.
fn two_on_one_connection(addr: &str, path: &str) -> Result<Vec<String>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut bodies = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for _ in 0..2 {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&pending).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .context("no Content-Length")?;
                if rest.len() >= len {
                    bodies.push(rest[..len].to_string());
                    pending = rest.as_bytes()[len..].to_vec();
                    break;
                }
            }
            let n = s.read(&mut buf)?;
            ensure!(n > 0, "connection closed after {} answers", bodies.len());
            pending.extend_from_slice(&buf[..n]);
        }
    }
    Ok(bodies)
}

/// The kubelet's WebSocket port-forward protocol (`v4.channel.k8s.io`), as clients other than
/// kubectl speak it (the API server passes it to the node as it is): one GET of `path` through
/// the pod's `port`, over TLS to the API server with `openssl s_client`, `token` as the caller.
/// Returns the pod's answer, read from data channel 0.
fn websocket_forward(
    cluster: &Cluster,
    token: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<String> {
    let host = cluster
        .api_server
        .trim_start_matches("https://")
        .to_string();
    let mut ssl = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &host])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut w = ssl.stdin.take().context("stdin")?;
    let mut r = ssl.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = r.read(&mut b) {
            if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let more = |buf: &mut Vec<u8>| -> Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => {
                buf.extend_from_slice(&b);
                Ok(true)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(false),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("no answer in {TIMEOUT:?}"),
        }
    };
    let mut buf: Vec<u8> = Vec::new();
    write!(
        w,
        "GET /api/v1/namespaces/default/pods/{pod}/portforward?ports={port} HTTP/1.1\r\n\
         Host: {host}\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    )?;
    w.flush()?;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(more(&mut buf)?, "connection closed in the handshake");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    ensure!(
        head.starts_with("HTTP/1.1 101") && head.to_ascii_lowercase().contains("v4.channel.k8s.io"),
        "WebSocket handshake: {head}"
    );
    buf.drain(..head_end);
    // Server frames are not masked: (channel, payload) of each binary message, None at the end.
    let frame = |buf: &mut Vec<u8>| -> Result<Option<(u8, Vec<u8>)>> {
        loop {
            if buf.len() >= 2 {
                let header = match buf[1] & 0x7f {
                    127 => bail!("a frame over 64 KiB"),
                    126 if buf.len() >= 4 => {
                        Some((usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4))
                    }
                    126 => None,
                    n => Some((usize::from(n), 2)),
                };
                if let Some((len, at)) = header
                    && buf.len() >= at + len
                {
                    let opcode = buf[0] & 0x0f;
                    let payload: Vec<u8> = buf[at..at + len].to_vec();
                    buf.drain(..at + len);
                    if opcode == 8 {
                        return Ok(None);
                    }
                    if opcode == 2 && !payload.is_empty() {
                        return Ok(Some((payload[0], payload[1..].to_vec())));
                    }
                    continue;
                }
            }
            if !more(buf)? {
                return Ok(None);
            }
        }
    };
    // The port first, on the data and the error channel.
    for ch in [0u8, 1] {
        let got = frame(&mut buf)?;
        ensure!(
            got == Some((ch, port.to_le_bytes().to_vec())),
            "first message on channel {ch}: {got:?}"
        );
    }
    // A masked binary frame on data channel 0.
    let mut payload = vec![0u8];
    payload.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    ensure!(payload.len() < 126, "request too long for this client");
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x82, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    w.write_all(&f)?;
    w.flush()?;
    let mut answer = Vec::new();
    while let Some((ch, data)) = frame(&mut buf)? {
        ensure!(
            ch == 0,
            "channel {ch}: {:?}",
            String::from_utf8_lossy(&data)
        );
        answer.extend_from_slice(&data);
    }
    let _ = ssl.kill();
    let _ = ssl.wait();
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[test]
fn port_forward_exec_and_pods_on_a_wasm_node() -> Result<()> {
    // The API server proxies to no node at a loopback address (`/api/v1/nodes/N/proxy/...`
    // answers "address not allowed"): the node gets a veth address of the test's own.
    let net = NetNs::new()?;
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let host = net.host_ip.to_string();
    let agent = Agent::start_ready(&cluster, AgentOptions::new(NODE).ip(&host), TIMEOUT)?;
    let hello = registry.push_guest("hello")?;
    let component = registry.push_component("http-hello")?;

    let wagi_port = free_port();
    cluster.apply(&hello_pod(
        "pf-wagi",
        &format!("127.0.0.1:{wagi_port}"),
        &hello,
    ))?;
    let comp_port = free_port();
    cluster.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pf-component", "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": serde_json::from_str::<Value>(TOLERATIONS)?,
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "web", "image": component, "ports": [{"containerPort": comp_port}]}],
        },
    }))?;
    wait_ready(&cluster, "pf-wagi").with_context(|| agent.output())?;
    wait_ready(&cluster, "pf-component").with_context(|| agent.output())?;

    // A WAGI pod's default-host port: several connections through one forward, one after the
    // other, two requests on one keep-alive connection, and four at once.
    let fwd = port_forward(&cluster, "pod/pf-wagi", wagi_port)?;
    for i in 0..3 {
        let r =
            get(&fwd.addr(), "/hello").with_context(|| format!("request {i}: {}", fwd.output()))?;
        ensure!(
            (r.status, r.body.as_str()) == (200, "hello world\n"),
            "request {i} through the forward: {r:?}"
        );
    }
    let bodies = two_on_one_connection(&fwd.addr(), "/hello")?;
    ensure!(bodies == ["hello world\n", "hello world\n"], "{bodies:?}");
    let at_once: Vec<_> = (0..4)
        .map(|_| {
            let a = fwd.addr();
            std::thread::spawn(move || get(&a, "/hello"))
        })
        .collect();
    for t in at_once {
        let r = t.join().map_err(|_| anyhow::anyhow!("client thread"))??;
        ensure!(r.body == "hello world\n", "{r:?}");
    }
    // While a connection is open through the forward, the node holds one to the pod; once
    // kubectl is gone, none.
    let mut open = TcpStream::connect(fwd.addr())?;
    open.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut first = [0u8; 12];
    open.read_exact(&mut first)?;
    ensure!(
        &first == b"HTTP/1.1 200",
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    ensure!(
        connections_on(wagi_port)? >= 2,
        "no connection to the pod's port"
    );
    drop(fwd);
    cluster
        .wait_for(
            "the node to close its connections to the pod",
            TIMEOUT,
            || Ok(connections_on(wagi_port)? == 0),
        )
        .context("after kubectl port-forward went away")?;
    drop(open);

    // An HTTP component's containerPort, with kubectl speaking SPDY to the API server too.
    for via in [Via::WebSocket, Via::Spdy] {
        let fwd = port_forward_via(&cluster, "pod/pf-component", comp_port, via)?;
        for _ in 0..2 {
            let r = get(&fwd.addr(), "/").with_context(|| format!("{via:?}: {}", fwd.output()))?;
            ensure!(
                (r.status, r.body.as_str()) == (200, "Hello from a wasi:http component\n"),
                "component through the forward ({via:?}): {r:?}"
            );
        }
    }

    // A port the pod does not serve: the connection closes with nothing, and kubectl says why
    // and exits.
    let unserved = free_port();
    let mut fwd = port_forward(&cluster, "pod/pf-wagi", unserved)?;
    let mut s = TcpStream::connect(fwd.addr())?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let _ = s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    ensure!(
        got.is_empty(),
        "answer from an unserved port: {:?}",
        String::from_utf8_lossy(&got)
    );
    let out = fwd.wait_exit(TIMEOUT)?;
    eprintln!(
        "kubectl port-forward to an unserved port says: {}",
        out.trim()
    );
    ensure!(
        out.contains(&format!(
            "pod default/pf-wagi does not serve port {unserved}"
        )) && out.contains(&wagi_port.to_string()),
        "kubectl port-forward to an unserved port: {out}"
    );

    // Deleting the pod ends a forward that is running.
    let mut fwd = port_forward(&cluster, "pod/pf-component", comp_port)?;
    ensure!(get(&fwd.addr(), "/")?.status == 200);

    // `kubectl exec` and `attach`: refused at once, saying why.
    let (ok, out) = kubectl_bounded(
        &cluster,
        &["exec", "-n", "default", "pf-wagi", "--", "sh"],
        Duration::from_secs(60),
    )?;
    ensure!(
        !ok && out.contains("pf-wagi")
            && out.contains("WebAssembly pod")
            && out.contains("no shell"),
        "kubectl exec: {out}"
    );
    eprintln!("kubectl exec says: {}", out.trim());
    let (ok, out) = kubectl_bounded(
        &cluster,
        &["attach", "-n", "default", "pf-wagi"],
        Duration::from_secs(60),
    )?;
    ensure!(
        !ok && out.contains("pf-wagi") && out.contains("no TTY"),
        "kubectl attach: {out}"
    );
    eprintln!("kubectl attach says: {}", out.trim());

    // `/pods` through the API server's node proxy.
    let list: Value = serde_json::from_str(&cluster.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes/{NODE}/proxy/pods"),
    ])?)?;
    let names: Vec<&str> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        list["kind"] == "PodList" && names.contains(&"pf-wagi") && names.contains(&"pf-component"),
        "/pods: {list}"
    );
    let listed = list["items"]
        .as_array()
        .and_then(|i| i.iter().find(|p| p["metadata"]["name"] == "pf-wagi"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        listed["spec"]["nodeName"] == NODE && listed["status"]["phase"] == "Running",
        "{listed}"
    );

    // A caller without nodes/proxy, straight at the kubelet API.
    let token = cluster.kubectl(&["create", "token", "default", "-n", "default"])?;
    let auth = format!("Authorization: Bearer {}", token.trim());
    let base = format!("https://127.0.0.1:{}", agent.port);
    for (method, path) in [
        ("POST", "/portForward/default/pf-wagi"),
        ("GET", "/pods"),
        ("POST", "/exec/default/pf-wagi/hello?command=sh"),
    ] {
        let code = curl_code(&[
            "-X",
            method,
            "-H",
            &auth,
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: SPDY/3.1",
            "-H",
            "X-Stream-Protocol-Version: portforward.k8s.io",
            &format!("{base}{path}"),
        ])?;
        ensure!(
            code == "403",
            "{method} {path} without nodes/proxy: HTTP {code}"
        );
    }

    // The kubelet's WebSocket protocol, as a client other than kubectl speaks it through the
    // API server (which hands it to the node unchanged), with a caller allowed to forward.
    cluster.kubectl(&["create", "serviceaccount", "forwarder", "-n", "default"])?;
    cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        "forwarder",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:forwarder",
    ])?;
    let admin = cluster.kubectl(&["create", "token", "forwarder", "-n", "default"])?;
    let answer = websocket_forward(&cluster, admin.trim(), "pf-wagi", wagi_port, "/hello")?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello world\n"),
        "through the WebSocket protocol: {answer:?}"
    );

    cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        "default",
        "pf-component",
        "--wait=false",
    ])?;
    let out = fwd.wait_exit(TIMEOUT)?;
    eprintln!("kubectl port-forward after the pod was deleted: {out}");
    cluster
        .wait_for("no connection left to the deleted pod", TIMEOUT, || {
            Ok(connections_on(comp_port)? == 0)
        })
        .with_context(|| agent.output())?;
    Ok(())
}
