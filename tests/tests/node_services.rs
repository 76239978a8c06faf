//! Services reach wasm pods: a node with a real address (the host end of a veth pair whose other
//! end is in a network namespace the test creates), EndpointSlices from the real
//! kube-controller-manager following the pods' readiness, and a real kube-proxy inside the
//! namespace carrying traffic for the Service's ClusterIP to the pods over the veth.
//!
//! Needs root and iproute2 (tools/setup). Run:
//! `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test node_services`

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS};
use e2e::cluster::{self, Cluster};
use e2e::netns::NetNs;
use e2e::registry::Registry;
use e2e::stallproxy::StallProxy;
use e2e::wasinode::free_port;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const NODE: &str = "wasi-svc-node";

/// Whether `ip` lists an interface or a namespace named `name`.
fn exists(name: &str) -> Result<bool> {
    let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
    let nss = Command::new("ip").args(["netns", "list"]).output()?;
    let mentions = |out: &[u8]| {
        String::from_utf8_lossy(out).lines().any(|l| {
            l.split(|c: char| c.is_whitespace() || c == ':' || c == '@')
                .any(|w| w == name)
        })
    };
    Ok(mentions(&links.stdout) || mentions(&nss.stdout))
}

/// A process inside the namespace reaches a listener on the host end's address over the veth;
/// dropping the NetNs removes the namespace and both ends; and a pair left by a dead process is
/// swept by the next NetNs::new.
#[test]
fn netns_reaches_the_host_end_and_is_removed() -> Result<()> {
    // What a killed test process would leave behind (its PID above pid_max, so never alive).
    let (stale_ns, stale_link) = ("wasinode-4194399-0", "wn4194399-0h");
    let ip = |args: &[&str]| Command::new("ip").args(args).status();
    ensure!(ip(&["netns", "add", stale_ns])?.success());
    ensure!(
        ip(&[
            "link",
            "add",
            stale_link,
            "type",
            "veth",
            "peer",
            "name",
            "wn4194399-0p"
        ])?
        .success()
    );

    let net = NetNs::new()?;
    ensure!(
        !exists(stale_ns)? && !exists(stale_link)?,
        "stale pair not swept"
    );
    ensure!(!net.host_ip.is_loopback() && !net.ns_ip.is_loopback());
    let listener = TcpListener::bind((net.host_ip, 0))?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut conn, peer) = listener.accept()?;
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf)?;
        let body = peer.ip().to_string();
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        Ok(())
    });
    let url = format!("http://{}:{port}/", net.host_ip);
    let seen = net.run(&["curl", "-sS", "--max-time", "10", &url])?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    // The client was the namespace's end of the pair.
    ensure!(seen == net.ns_ip.to_string(), "peer was {seen}");

    let (name, host_if) = (net.name.clone(), net.host_if.clone());
    ensure!(exists(&name)? && exists(&host_if)?);
    drop(net);
    ensure!(!exists(&name)? && !exists(&host_if)?, "not removed on drop");
    Ok(())
}

/// NetNs in one process get blocks that do not overlap, whatever their sizes, and every host
/// address of a larger one is reachable from its namespace.
#[test]
fn netns_pairs_do_not_share_addresses() -> Result<()> {
    let a = NetNs::new()?;
    let b = NetNs::with_hosts(3).context("a second NetNs")?;
    let c = NetNs::new().context("a third NetNs")?;
    let block = |n: &NetNs| {
        let mask = u32::MAX << (32 - n.prefix_len);
        let first = u32::from(n.host_ip) & mask;
        (first, first | !mask)
    };
    let blocks = [block(&a), block(&b), block(&c)];
    for (i, x) in blocks.iter().enumerate() {
        for y in &blocks[i + 1..] {
            ensure!(x.1 < y.0 || y.1 < x.0, "{blocks:?} overlap");
        }
    }
    ensure!(b.host_ips.len() == 3 && b.prefix_len == 29, "{b:?}");
    for addr in &b.host_ips {
        let listener = TcpListener::bind((*addr, 0))?;
        let port = listener.local_addr()?.port();
        let url = format!("telnet://{addr}:{port}");
        // curl connects, then gives up on the silent server; the accept is what counts.
        let _ = b.output(&["curl", "-s", "--max-time", "1", &url])?;
        listener.set_nonblocking(true)?;
        ensure!(listener.accept().is_ok(), "nothing reached {addr}:{port}");
    }
    Ok(())
}

/// Builds (or finds in the cache) kube-proxy of the control plane's release
/// (`tools/cluster kube-proxy`); returns its path.
fn kube_proxy_binary() -> Result<PathBuf> {
    let out = Command::new(cluster::script())
        .arg("kube-proxy")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running tools/cluster kube-proxy")?;
    ensure!(
        out.status.success(),
        "tools/cluster kube-proxy failed ({})",
        out.status
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A real kube-proxy (iptables mode) running inside `net`'s namespace as `system:kube-proxy`,
/// for node `node`. The API server listens on the root namespace's loopback only, which the
/// namespace cannot reach: kube-proxy reaches it through a forwarder on the veth's host end
/// (the kubeconfig names that address, and `localhost` as the server name the certificate holds).
/// Killed on drop.
struct KubeProxy {
    child: Child,
    log: PathBuf,
    _forward: StallProxy,
    _dir: tempfile::TempDir,
}

impl KubeProxy {
    fn start(net: &NetNs, cluster: &Cluster, node: &str) -> Result<KubeProxy> {
        let bin = kube_proxy_binary()?;
        let api: SocketAddr = cluster
            .api_server
            .trim_start_matches("https://")
            .parse()
            .context("the API server's address")?;
        let forward = StallProxy::start_on(net.host_ip.into(), api)?;
        let dir = tempfile::Builder::new()
            .prefix("wasinode-kube-proxy-")
            .tempdir()?;
        let original = std::fs::read_to_string(cluster.dir.join("kube-proxy.kubeconfig"))?;
        let server = format!("    server: {}\n", cluster.api_server);
        ensure!(
            original.contains(&server),
            "unexpected kubeconfig:\n{original}"
        );
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            original.replace(
                &server,
                &format!(
                    "    server: https://{}\n    tls-server-name: localhost\n",
                    forward.addr()
                ),
            ),
        )?;
        let log = dir.path().join("kube-proxy.log");
        let out = std::fs::File::create(&log)?;
        let child = net
            .command(&bin.to_string_lossy())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--proxy-mode", "iptables", "--hostname-override", node])
            // Leave the host-wide conntrack table and timeouts alone.
            .args(["--conntrack-max-per-core", "0"])
            .args(["--conntrack-tcp-timeout-established", "0s"])
            .args(["--conntrack-tcp-timeout-close-wait", "0s"])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--iptables-min-sync-period", "0s", "-v", "2"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting kube-proxy")?;
        Ok(KubeProxy {
            child,
            log,
            _forward: forward,
            _dir: dir,
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails (with its log) if kube-proxy has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("kube-proxy exited ({status}):\n{}", self.output());
        }
        Ok(())
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WAGI pod serving `cgi_echo` on `/echo` at `:port` (its default-host), labelled
/// `group=<group>` and `who=<who>`, with `WHO=<who>` in its environment (so a response says which
/// pod answered). With `container_port`, the container declares `port` as containerPort `http`.
fn echo_pod(
    name: &str,
    who: &str,
    group: &str,
    port: u16,
    image: &str,
    container_port: bool,
) -> Result<Value> {
    let mut container = json!({
        "name": "echo",
        "image": image,
        "env": [{"name": "WHO", "value": who}],
    });
    if container_port {
        container["ports"] = json!([{"name": "http", "containerPort": port}]);
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"group": group, "who": who},
            "annotations": {
                "alpha.wagi.krustlet.dev/default-host": format!(":{port}"),
                "alpha.wagi.krustlet.dev/modules": r#"{"echo": {"route": "/echo"}}"#,
            },
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": serde_json::from_str::<Value>(TOLERATIONS)?,
            "terminationGracePeriodSeconds": 2,
            "containers": [container],
        },
    }))
}

fn service(name: &str, selector: Value, port: u16, target_port: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": port, "targetPort": target_port, "protocol": "TCP"}],
        },
    })
}

/// One endpoint of a Service's EndpointSlices: (pod, address, port, ready).
type Endpoint = (String, String, u64, bool);

/// The endpoints of Service `svc`'s EndpointSlices (from kube-controller-manager's
/// endpointslice controller), sorted.
fn endpoints(cluster: &Cluster, svc: &str) -> Result<Vec<Endpoint>> {
    let label = format!("kubernetes.io/service-name={svc}");
    let slices = cluster.kubectl_json(&["get", "endpointslices", "-n", "default", "-l", &label])?;
    let mut out = vec![];
    for slice in slices["items"].as_array().into_iter().flatten() {
        ensure!(
            slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                == "endpointslice-controller.k8s.io",
            "{slice}"
        );
        let port = slice["ports"][0]["port"].as_u64().unwrap_or(0);
        for ep in slice["endpoints"].as_array().into_iter().flatten() {
            for addr in ep["addresses"].as_array().into_iter().flatten() {
                out.push((
                    ep["targetRef"]["name"].as_str().unwrap_or("").to_string(),
                    addr.as_str().unwrap_or("").to_string(),
                    port,
                    ep["conditions"]["ready"] == true,
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Waits until Service `svc`'s EndpointSlices hold exactly `want`.
fn wait_endpoints(cluster: &Cluster, svc: &str, want: &[Endpoint]) -> Result<()> {
    let mut want = want.to_vec();
    want.sort();
    let mut last = vec![];
    cluster
        .wait_for(&format!("the EndpointSlices of {svc}"), TIMEOUT, || {
            last = endpoints(cluster, svc)?;
            Ok(last == want)
        })
        .with_context(|| format!("last seen: {last:?}; wanted {want:?}"))
}

/// The ClusterIP of Service `svc`.
fn cluster_ip(cluster: &Cluster, svc: &str) -> Result<String> {
    let s = cluster.kubectl_json(&["get", "service", svc, "-n", "default"])?;
    s["spec"]["clusterIP"]
        .as_str()
        .map(str::to_string)
        .context("no clusterIP")
}

/// `GET url` from inside the namespace: the `WHO` of the pod that answered, or an error.
fn who_answers(net: &NetNs, url: &str) -> Result<String> {
    let body = net.run(&["curl", "-sS", "--fail", "--max-time", "5", url])?;
    body.lines()
        .find_map(|l| l.strip_prefix("WHO="))
        .map(str::to_string)
        .with_context(|| format!("no WHO in {body}"))
}

/// Which pods answer `requests` GETs of `url` from inside the namespace.
fn who_answers_all(net: &NetNs, url: &str, requests: usize) -> Result<BTreeSet<String>> {
    (0..requests).map(|_| who_answers(net, url)).collect()
}

/// A node whose address is the host end of a veth pair: its pods report that address as podIP,
/// a Service selecting them gets EndpointSlices from the real controller-manager with the
/// containerPort (named) or the WAGI default-host port (numbered) as targetPort, and a real
/// kube-proxy in the namespace carries the Service's ClusterIP traffic over the veth to both pods.
#[test]
fn services_reach_wasm_pods_through_kube_proxy() -> Result<()> {
    let net = NetNs::new()?;
    let host = net.host_ip.to_string();
    kube_proxy_binary()?;
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let opts = AgentOptions::new(NODE)
        .ip(&host)
        .args(&["--pod-address", &host]);
    let agent = Agent::start_ready(&cluster, opts, TIMEOUT)?;
    let result = services(&net, &cluster, &registry, &host);
    result.with_context(|| agent.output())?;
    drop(agent);
    cluster.down()
}

fn services(net: &NetNs, cluster: &Cluster, registry: &Registry, host: &str) -> Result<()> {
    let node = cluster.kubectl_json(&["get", "node", NODE])?;
    let addresses = &node["status"]["addresses"];
    ensure!(
        addresses
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["type"] == "InternalIP" && a["address"] == host),
        "{addresses}"
    );

    let image = registry.push_guest("cgi_echo")?;
    // echo-b is ready while its readinessProbe (httpGet of its own /ready) passes.
    let mut gate = Gate::open()?;
    let health = registry.push_guest("health")?;
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    ensure!(pa != pb && pb != pc && pa != pc);
    cluster.apply(&json!({"apiVersion": "v1", "kind": "List", "items": [
        echo_pod("echo-a", "a", "named", pa, &image, true)?,
        with_readiness(echo_pod("echo-b", "b", "named", pb, &image, true)?, &health, &gate),
        // A WAGI pod with no containerPort: its default-host port is the numbered targetPort.
        echo_pod("echo-c", "c", "numbered", pc, &image, false)?,
        service("svc-named", json!({"group": "named"}), 80, json!("http")),
        service("svc-numbered", json!({"group": "numbered"}), 8080, json!(pc)),
    ]}))?;
    for name in ["echo-a", "echo-b", "echo-c"] {
        cluster.wait_for(&format!("{name} Ready"), TIMEOUT, || {
            let pod = cluster.pod(name)?;
            Ok(pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })?;
        let status = &cluster.pod(name)?["status"];
        ensure!(status["podIP"] == host, "{name}: {status}");
        ensure!(
            status["podIPs"] == json!([{"ip": host}]),
            "{name}: {status}"
        );
        ensure!(status["hostIP"] == host, "{name}: {status}");
    }

    let ep = |pod: &str, port: u16, ready: bool| {
        (pod.to_string(), host.to_string(), u64::from(port), ready)
    };
    wait_endpoints(
        cluster,
        "svc-named",
        &[ep("echo-a", pa, true), ep("echo-b", pb, true)],
    )?;
    wait_endpoints(cluster, "svc-numbered", &[ep("echo-c", pc, true)])?;

    let named = format!("http://{}:80/echo", cluster_ip(cluster, "svc-named")?);
    let numbered = format!("http://{}:8080/echo", cluster_ip(cluster, "svc-numbered")?);
    // Nothing answers on a ClusterIP before kube-proxy runs (the host end forwards nothing).
    ensure!(who_answers(net, &numbered).is_err());

    let mut proxy = KubeProxy::start(net, cluster, NODE)?;
    // kube-proxy has written its rules once the ClusterIP answers.
    cluster
        .wait_for(
            "the ClusterIP to answer through kube-proxy",
            TIMEOUT,
            || {
                proxy.check_running()?;
                who_answers(net, &numbered).map(|w| w == "c")
            },
        )
        .with_context(|| proxy.output())?;
    // Both endpoints are in the rotation (each request picks one at random: 40 requests all
    // to one of two would happen once in 2^39 runs).
    let seen = who_answers_all(net, &named, 40)?;
    ensure!(
        seen == BTreeSet::from(["a".into(), "b".into()]),
        "answered by {seen:?}"
    );
    // Through kube-proxy's rules: its chains DNAT the ClusterIP to the pods' address and ports.
    let rules = net.run(&["iptables-save", "-t", "nat"])?;
    for port in [pa, pb, pc] {
        let dnat = format!("--to-destination {host}:{port}");
        ensure!(rules.contains(&dnat), "no {dnat} in:\n{rules}");
    }

    // echo-b's readiness fails: it is not Ready, its endpoint stays in the slice but not ready,
    // and the ClusterIP's rotation is echo-a alone.
    gate.close()?;
    wait_endpoints(
        cluster,
        "svc-named",
        &[ep("echo-a", pa, true), ep("echo-b", pb, false)],
    )?;
    ensure!(!pod_ready(cluster, "echo-b")?, "echo-b still Ready");
    let running = &cluster.pod("echo-b")?["status"];
    ensure!(running["phase"] == "Running", "{running}");
    // kube-proxy applies the change within its sync: wait until a request reaches only echo-a
    // 40 times in a row (bounded), then check that no request of the next 40 reaches echo-b.
    cluster
        .wait_for("echo-b out of the ClusterIP's rotation", TIMEOUT, || {
            proxy.check_running()?;
            Ok(who_answers_all(net, &named, 40)? == BTreeSet::from(["a".into()]))
        })
        .with_context(|| proxy.output())?;
    let seen = who_answers_all(net, &named, 40)?;
    ensure!(seen == BTreeSet::from(["a".into()]), "answered by {seen:?}");

    // Ready again: back in the slice and in the rotation.
    gate.reopen()?;
    wait_endpoints(
        cluster,
        "svc-named",
        &[ep("echo-a", pa, true), ep("echo-b", pb, true)],
    )?;
    cluster
        .wait_for("echo-b back in the ClusterIP's rotation", TIMEOUT, || {
            Ok(who_answers_all(net, &named, 40)?.contains("b"))
        })
        .with_context(|| proxy.output())?;
    Ok(())
}

fn pod_ready(cluster: &Cluster, name: &str) -> Result<bool> {
    let pod = cluster.pod(name)?;
    Ok(pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// `pod` (an `echo_pod` with its containerPort `http`) with a second WAGI container, the
/// `health` guest on `/ready` reading `gate`'s folder (a hostPath volume at `/state`), and a
/// readinessProbe of `/ready` on the pod's own port every second (one failure or success counts).
fn with_readiness(mut pod: Value, health_image: &str, gate: &Gate) -> Value {
    pod["metadata"]["annotations"]["alpha.wagi.krustlet.dev/modules"] =
        json!(r#"{"echo": {"route": "/echo"}, "health": {"route": "/ready"}}"#);
    pod["spec"]["containers"][0]["readinessProbe"] = json!({
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": 1,
        "timeoutSeconds": 2,
        "failureThreshold": 1,
        "successThreshold": 1,
    });
    if let Some(containers) = pod["spec"]["containers"].as_array_mut() {
        containers.push(json!({
            "name": "health",
            "image": health_image,
            "volumeMounts": [{"name": "state", "mountPath": "/state"}],
        }));
    }
    pod["spec"]["volumes"] = json!([
        {"name": "state", "hostPath": {"path": gate.dir.path().to_string_lossy()}}
    ]);
    pod
}

/// The readiness switch of a pod made `with_readiness`: while `ready.fail` exists in the folder,
/// its `/ready` answers 500.
struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    fn open() -> Result<Gate> {
        Ok(Gate {
            dir: tempfile::Builder::new()
                .prefix("wasinode-ready-")
                .tempdir()?,
        })
    }

    /// The pod's readiness fails from now on.
    fn close(&mut self) -> Result<()> {
        std::fs::write(self.dir.path().join("ready.fail"), b"")?;
        Ok(())
    }

    /// The pod's readiness passes again.
    fn reopen(&mut self) -> Result<()> {
        std::fs::remove_file(self.dir.path().join("ready.fail"))?;
        Ok(())
    }
}

/// `wasinode nodepool ARGS --kubeconfig <admin> --state-dir DIR` to completion; its stdout.
fn nodepool(cluster: &Cluster, state: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(e2e::wasinode::binary())
        .arg("nodepool")
        .args(args)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .context("running wasinode nodepool")?;
    ensure!(
        out.status.success(),
        "nodepool {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the pool when the test ends, passed or failed (its provisioner drains and stops the
/// agents), and then kills whatever of it still runs.
struct PoolGuard<'a> {
    cluster: &'a Cluster,
    state: &'a std::path::Path,
    pool: &'a str,
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        let _ = nodepool(
            self.cluster,
            self.state,
            &["delete", self.pool, "--timeout", "60s"],
        );
        let pid_file = self.state.join(self.pool).join("provisioner.pid");
        if let Ok(pid) = std::fs::read_to_string(pid_file) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

/// A node pool whose nodes have real addresses (`nodepool add --address-base`: the host end's
/// addresses of a veth pair) backs a Service: the Deployment's two pods, one per node on the same
/// port, are the Service's endpoints at their nodes' addresses, and kube-proxy in the namespace
/// reaches both.
#[test]
fn node_pool_nodes_with_real_addresses_back_a_service() -> Result<()> {
    let net = NetNs::with_hosts(2)?;
    kube_proxy_binary()?;
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let image = registry.push_guest("cgi_echo")?;
    let state = tempfile::tempdir()?;
    let base = net.host_ips[0].to_string();
    let kubelet_port = free_port().to_string();
    let pool = PoolGuard {
        cluster: &cluster,
        state: state.path(),
        pool: "svcpool",
    };
    nodepool(
        &cluster,
        state.path(),
        &[
            "add",
            "--name",
            "svcpool",
            "--node-count",
            "2",
            "--address-base",
            &base,
            "--kubelet-port",
            &kubelet_port,
            "--eviction-hard",
            e2e::agent::EVICTION_HARD,
        ],
    )?;
    let addrs: Vec<String> = net.host_ips.iter().map(|a| a.to_string()).collect();
    for (i, addr) in addrs.iter().enumerate() {
        let node = cluster.kubectl_json(&["get", "node", &format!("svcpool-00000{i}")])?;
        let a = &node["status"]["addresses"];
        ensure!(
            a.as_array()
                .into_iter()
                .flatten()
                .any(|a| a["type"] == "InternalIP" && a["address"] == addr.as_str()),
            "{a}"
        );
    }

    let port = free_port();
    let mut pod = echo_pod("unused", "", "pool", port, &image, false)?;
    pod["spec"]["containers"][0]["env"] =
        json!([{"name": "WHO", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]);
    pod["spec"]["affinity"] = json!({"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"group": "pool"}},
        }],
    }});
    let template = json!({"metadata": {
        "labels": {"group": "pool"},
        "annotations": pod["metadata"]["annotations"].clone(),
    }, "spec": pod["spec"].clone()});
    cluster.apply(&json!({"apiVersion": "v1", "kind": "List", "items": [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "pool-echo", "namespace": "default"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"group": "pool"}},
                "template": template,
            },
        },
        service("svc-pool", json!({"group": "pool"}), 80, json!(port)),
    ]}))?;
    let mut last = vec![];
    cluster
        .wait_for(
            "two ready endpoints at the pool nodes' addresses",
            TIMEOUT,
            || {
                last = endpoints(&cluster, "svc-pool")?;
                let mut seen: Vec<(String, u64, bool)> = last
                    .iter()
                    .map(|(_, a, p, r)| (a.clone(), *p, *r))
                    .collect();
                seen.sort();
                Ok(seen
                    == addrs
                        .iter()
                        .map(|a| (a.clone(), u64::from(port), true))
                        .collect::<Vec<_>>())
            },
        )
        .with_context(|| format!("last seen: {last:?}"))?;

    let mut proxy = KubeProxy::start(&net, &cluster, "svcpool-000000")?;
    let url = format!("http://{}:80/echo", cluster_ip(&cluster, "svc-pool")?);
    cluster
        .wait_for(
            "the ClusterIP to answer through kube-proxy",
            TIMEOUT,
            || {
                proxy.check_running()?;
                who_answers(&net, &url).map(|_| true)
            },
        )
        .with_context(|| proxy.output())?;
    let seen = who_answers_all(&net, &url, 40)?;
    ensure!(
        seen == BTreeSet::from(["svcpool-000000".into(), "svcpool-000001".into()]),
        "answered by {seen:?}"
    );
    drop(proxy);
    drop(pool);
    cluster.down()
}

/// The addresses `ip` lists on interface `dev` of the root namespace.
fn addresses_on(dev: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", dev])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// With `--pod-cidr`, each pod has its own address (on the node-local interface it names): two
/// pods on one node serve the same port, report their own podIPs (hostIP the node's), are a
/// Service's endpoints at those addresses, and are both reached through kube-proxy; a deleted
/// pod's address leaves the interface and the Service.
#[test]
fn pods_with_their_own_addresses_share_a_port() -> Result<()> {
    let net = NetNs::with_pod_range(1, 29)?;
    let (range, len) = net.pod_range.context("a pod range")?;
    let cidr = format!("{range}/{len}");
    let host = net.host_ip.to_string();
    kube_proxy_binary()?;
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let opts = AgentOptions::new(NODE).ip(&host).args(&[
        "--pod-cidr",
        &cidr,
        "--pod-interface",
        &net.host_if,
    ]);
    let agent = Agent::start_ready(&cluster, opts, TIMEOUT)?;
    let result = own_addresses(&net, &cluster, &registry, &host);
    result.with_context(|| agent.output())?;
    drop(agent);
    cluster.down()
}

fn own_addresses(net: &NetNs, cluster: &Cluster, registry: &Registry, host: &str) -> Result<()> {
    let image = registry.push_guest("cgi_echo")?;
    let port = free_port();
    // Each pod's environment names its own address (a fieldRef to status.podIP).
    let own_pod = |name: &str, who: &str| -> Result<Value> {
        let mut pod = echo_pod(name, who, "own", port, &image, true)?;
        pod["spec"]["containers"][0]["env"] = json!([
            {"name": "WHO", "value": who},
            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ]);
        Ok(pod)
    };
    cluster.apply(&json!({"apiVersion": "v1", "kind": "List", "items": [
        own_pod("own-a", "a")?,
        own_pod("own-b", "b")?,
        service("svc-own", json!({"group": "own"}), 80, json!("http")),
    ]}))?;
    let (range, len) = net.pod_range.context("a pod range")?;
    let first = u32::from(range);
    let in_range = |ip: &str| {
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| u32::from(a) > first && u32::from(a) < first + (1 << (32 - len)) - 1)
    };
    let mut ips = vec![];
    for name in ["own-a", "own-b"] {
        cluster.wait_for(&format!("{name} Ready"), TIMEOUT, || {
            pod_ready(cluster, name)
        })?;
        let status = &cluster.pod(name)?["status"];
        let ip = status["podIP"].as_str().unwrap_or("").to_string();
        ensure!(
            in_range(&ip),
            "{name}'s podIP {ip} is not in {range}/{len}: {status}"
        );
        ensure!(status["podIPs"] == json!([{"ip": ip}]), "{status}");
        ensure!(status["hostIP"] == host, "{status}");
        // Its own listener: the pod answers at its address from the namespace.
        let url = format!("http://{ip}:{port}/echo");
        let body = net.run(&["curl", "-sS", "--fail", "--max-time", "5", &url])?;
        ensure!(
            body.contains(&format!("WHO={}\n", &name[4..])),
            "{url}: {body}"
        );
        ensure!(body.contains(&format!("MY_IP={ip}\n")), "{url}: {body}");
        ips.push(ip);
    }
    ensure!(ips[0] != ips[1], "{ips:?}");
    let on_if = addresses_on(&net.host_if)?;
    for ip in &ips {
        ensure!(
            on_if.contains(&format!("inet {ip}/32")),
            "{ip} not on {}: {on_if}",
            net.host_if
        );
    }

    let ep = |pod: &str, ip: &str, ready: bool| {
        (pod.to_string(), ip.to_string(), u64::from(port), ready)
    };
    wait_endpoints(
        cluster,
        "svc-own",
        &[ep("own-a", &ips[0], true), ep("own-b", &ips[1], true)],
    )?;
    let mut proxy = KubeProxy::start(net, cluster, NODE)?;
    let url = format!("http://{}:80/echo", cluster_ip(cluster, "svc-own")?);
    cluster
        .wait_for(
            "the ClusterIP to answer through kube-proxy",
            TIMEOUT,
            || {
                proxy.check_running()?;
                who_answers(net, &url).map(|_| true)
            },
        )
        .with_context(|| proxy.output())?;
    let seen = who_answers_all(net, &url, 40)?;
    ensure!(
        seen == BTreeSet::from(["a".into(), "b".into()]),
        "answered by {seen:?}"
    );

    // Deleted: its address leaves the interface and the Service.
    cluster.delete_pod("own-a", TIMEOUT)?;
    let gone = format!("inet {}/32", ips[0]);
    cluster.wait_for("own-a's address to leave the interface", TIMEOUT, || {
        Ok(!addresses_on(&net.host_if)?.contains(&gone))
    })?;
    wait_endpoints(cluster, "svc-own", &[ep("own-b", &ips[1], true)])?;
    Ok(())
}
