//! `wasinode nodepool` on the real local control plane:
//! - the seed's walk-through with a pool instead of a hand-started agent: `nodepool add`,
//!   `nodepool show` JSON with `WasmWasi`, the node Ready with the seed's labels and taints, the
//!   seed's pod serving `hello world` through nginx, an agent killed and restarted by the
//!   provisioner, `kubectl delete`, and `nodepool delete` leaving no Node, process or port;
//!   the one-line errors of bad input;
//! - a three-node pool: Deployment pods with anti-affinity spread over its nodes; scaling down
//!   to one drains the others through the Eviction API and the successors serve on the last node.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test nodepool -- --nocapture`

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::cluster::Cluster;
use e2e::guests::guest;
use e2e::nginx::Nginx;
use e2e::registry::Registry;
use e2e::wasinode::{binary, free_port, get, listening};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

/// `wasinode nodepool ARGS --kubeconfig <admin> --state-dir DIR` to completion.
fn nodepool(cluster: &Cluster, state: &Path, args: &[&str]) -> Result<Output> {
    nodepool_as(&cluster.kubeconfig(), state, args)
}

fn nodepool_as(kubeconfig: &Path, state: &Path, args: &[&str]) -> Result<Output> {
    Command::new(binary())
        .arg("nodepool")
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .context("running wasinode nodepool")
}

fn ok(out: &Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A failed command's error: exactly one `error:` line (after any progress lines), containing
/// `want`.
fn one_line_error(out: &Output, want: &str) -> Result<()> {
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.contains("error:")).collect();
    ensure!(
        errors.len() == 1 && lines.last() == errors.first().copied() && errors[0].contains(want),
        "expected one error line containing {want:?}, got:\n{err}"
    );
    eprintln!("error as expected: {}", errors[0]);
    Ok(())
}

fn provisioner_log(state: &Path, pool: &str) -> String {
    std::fs::read_to_string(state.join(pool).join("provisioner.log")).unwrap_or_default()
}

/// Pids of the processes whose command line mentions `needle` (the pool's state dir).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if pid != me && String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

fn node_pids(state: &Path, node: &str) -> Vec<u32> {
    processes_mentioning(&format!("{}/", state.display()))
        .into_iter()
        .filter(|pid| {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(" node ") && c.contains(&format!("--node-name {node} "))
        })
        .collect()
}

/// Stops whatever a test's pools still run when the test ends (passed or failed): their
/// provisioners, which stop their agents.
struct Leftovers<'a>(&'a Path);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let provisioners: Vec<u32> = processes_mentioning(&self.0.display().to_string())
            .into_iter()
            .filter(|pid| {
                let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&c).contains("provision")
            })
            .collect();
        for pid in &provisioners {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        for _ in 0..300 {
            if processes_mentioning(&self.0.display().to_string()).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in processes_mentioning(&self.0.display().to_string()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn pod_running(cluster: &Cluster, state: &Path, pod: &str, containers: usize) -> Result<Value> {
    let waited = cluster.wait_for(&format!("{pod} Running and ready"), TIMEOUT, || {
        let p = cluster.kubectl_json(&["get", "pod", pod])?;
        let statuses = p["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(p["status"]["phase"] == "Running"
            && statuses.len() == containers
            && statuses.iter().all(|c| c["ready"] == true))
    });
    explained(cluster, state, waited)?;
    cluster.kubectl_json(&["get", "pod", pod])
}

/// `result`, or its error with what a person would look at next: the end of each provisioner's
/// and agent's log under `state`, then the cluster's pods, Nodes and latest Events.
fn explained<T>(cluster: &Cluster, state: &Path, result: Result<T>) -> Result<T> {
    result.map_err(|e| {
        let mut out = String::new();
        let mut logs = Vec::new();
        let mut dirs = vec![state.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "log") {
                    logs.push(path);
                }
            }
        }
        logs.sort();
        for log in logs {
            out += &format!("\n--- last lines of {}\n", log.display());
            out += &last_lines(&std::fs::read_to_string(&log).unwrap_or_default(), 30);
        }
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &[
                "get",
                "nodes",
                "-o",
                "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=='Ready')].status,TAINTS:.spec.taints[*].key",
            ],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            let got = cluster
                .kubectl(args)
                .unwrap_or_else(|e| format!("(failed: {e:#})"));
            out += &format!("\n--- kubectl {}\n", args.join(" "));
            out += &last_lines(&got, 30);
        }
        e.context(out)
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn pool_nodes(cluster: &Cluster, pool: &str) -> Result<Vec<String>> {
    let out = cluster.kubectl(&[
        "get",
        "nodes",
        "-l",
        &format!("agentpool={pool}"),
        "-o",
        "name",
    ])?;
    Ok(out
        .lines()
        .map(|l| l.trim_start_matches("node/").to_string())
        .collect())
}

/// After `nodepool delete`: no Node, no pool object, no token, no process, no port.
fn nothing_left(cluster: &Cluster, state: &Path, pool: &str, addrs: &[String]) -> Result<()> {
    ensure!(
        pool_nodes(cluster, pool)?.is_empty(),
        "Nodes of {pool} remain"
    );
    let pools = cluster.kubectl(&["get", "nodepools", "-o", "name"])?;
    ensure!(!pools.contains(pool), "NodePool {pool} remains: {pools}");
    let tokens = cluster.kubectl(&[
        "get",
        "secrets",
        "-n",
        "kube-system",
        "-l",
        &format!("wasinode.dev/nodepool={pool}"),
        "-o",
        "name",
    ])?;
    ensure!(
        tokens.trim().is_empty(),
        "bootstrap tokens remain: {tokens}"
    );
    let procs = processes_mentioning(&state.join(pool).display().to_string());
    ensure!(procs.is_empty(), "processes of {pool} remain: {procs:?}");
    for a in addrs {
        ensure!(!listening(a), "{a} still accepts connections");
    }
    Ok(())
}

#[test]
fn seed_walkthrough_through_a_node_pool() -> Result<()> {
    e2e::seed::build_demos()?;
    let cluster = Cluster::up()?;
    let registry = Registry::start();
    e2e::seed::push_demos(&registry)?;
    let state = tempfile::tempdir()?;
    let st = state.path();
    let _leftovers = Leftovers(st);
    let kubelet_port = free_port().to_string();

    // Bad input: one line each, saying what to do; nothing is created.
    one_line_error(
        &nodepool(&cluster, st, &["add", "--name", "My_Pool"])?,
        "invalid node pool name",
    )?;
    one_line_error(
        &nodepool(
            &cluster,
            st,
            &["add", "--name", "p", "--workload-runtime", "OCIContainer"],
        )?,
        "container node pools belong to the cluster's own tooling",
    )?;
    one_line_error(
        &nodepool_as(Path::new("/nonexistent/kubeconfig"), st, &["list"])?,
        "pass --kubeconfig FILE or set KUBECONFIG",
    )?;
    // A user without rights on CRDs: a ServiceAccount token.
    cluster.kubectl(&["create", "serviceaccount", "nobody"])?;
    let token = cluster.kubectl(&["create", "token", "nobody"])?;
    let nobody = st.join("nobody.kubeconfig");
    let server = cluster.kubectl(&[
        "config",
        "view",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ])?;
    std::fs::write(
        &nobody,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
            cluster.ca_crt().display(),
            token.trim()
        ),
    )?;
    one_line_error(
        &nodepool_as(&nobody, st, &["add", "--name", "denied"])?,
        "cluster admin",
    )?;

    // az aks nodepool add --workload-runtime wasmwasi --node-count 1
    let out = nodepool(
        &cluster,
        st,
        &[
            "add",
            "--name",
            "mywasipool",
            "--node-count",
            "1",
            "--workload-runtime",
            "WasmWasi",
            "--address-base",
            "127.101.0.1",
            "--kubelet-port",
            &kubelet_port,
            "--eviction-hard",
            e2e::agent::EVICTION_HARD,
        ],
    )?;
    let shown: Value = serde_json::from_str(&ok(&out, "nodepool add")?)?;
    eprintln!("nodepool add printed:\n{shown:#}");
    ensure!(shown["workloadRuntime"] == "WasmWasi", "{shown}");
    ensure!(shown["count"] == 1 && shown["readyNodes"] == 1, "{shown}");
    ensure!(
        shown["nodes"][0]["name"] == "mywasipool-000000" && shown["nodes"][0]["ready"] == true,
        "{shown}"
    );
    let node = "mywasipool-000000";

    one_line_error(
        &nodepool(&cluster, st, &["add", "--name", "mywasipool"])?,
        "already exists",
    )?;
    let show: Value = serde_json::from_str(&ok(
        &nodepool(&cluster, st, &["show", "mywasipool"])?,
        "nodepool show",
    )?)?;
    ensure!(
        show["workloadRuntime"] == "WasmWasi"
            && show["provisionerRunning"] == true
            && show["provisioningState"] == "Succeeded"
            && show["nodeTaints"].as_array().is_some_and(|t| t.len() == 2),
        "nodepool show: {show:#}"
    );
    let list = ok(&nodepool(&cluster, st, &["list"])?, "nodepool list")?;
    eprintln!("{list}");
    ensure!(
        list.lines().any(|l| l.starts_with("mywasipool")
            && l.contains("1/1")
            && l.contains("kubernetes.io/arch=wasm32-wagi:NoExecute")),
        "nodepool list:\n{list}"
    );
    let kget = cluster.kubectl(&["get", "nodepools"])?;
    eprintln!("{kget}");
    ensure!(
        kget.lines().any(|l| l.starts_with("mywasipool")
            && l.contains("WasmWasi")
            && l.contains("Succeeded")),
        "kubectl get nodepools:\n{kget}"
    );

    // kubectl get nodes -o wide / describe node: the seed's labels and taints, its own address.
    let wide = cluster.kubectl(&["get", "nodes", "-o", "wide"])?;
    eprintln!("{wide}");
    ensure!(
        wide.lines().any(|l| l.starts_with(node)
            && l.split_whitespace().nth(1) == Some("Ready")
            && l.contains("127.101.0.1")),
        "kubectl get nodes -o wide:\n{wide}"
    );
    e2e::agent::check_seed_node(&cluster, node, "mywasipool")?;

    // The seed's pod, through nginx as the seed's values.yaml configures it.
    let port = free_port();
    let pod_addr = format!("127.101.0.1:{port}");
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &e2e::seed::wasi_example(&registry, port)?,
    )?;
    let pod = pod_running(&cluster, st, "krustlet-wagi-demo", 5)?;
    ensure!(pod["spec"]["nodeName"] == node, "{}", pod["spec"]);
    let nginx_addr = format!("127.0.0.1:{}", free_port());
    let mut nginx = Nginx::start(
        &format!(
            "server {{\n  listen {nginx_addr};\n  location / {{\n    proxy_pass http://{pod_addr};\n  }}\n}}"
        ),
        &nginx_addr,
    )?;
    let hello = |what: &str| -> Result<()> {
        let r = get(&nginx_addr, "/hello")?;
        ensure!(
            (r.status, r.body.as_str()) == (200, "hello world\n"),
            "{what}: GET /hello through nginx: {r:?}\n{}",
            nginx.logs()
        );
        Ok(())
    };
    hello("first")?;

    // An agent that dies is restarted by the provisioner and serves again.
    let before = node_pids(st, node);
    ensure!(
        before.len() == 1,
        "one agent process for {node}: {before:?}"
    );
    Command::new("kill")
        .args(["-KILL", &before[0].to_string()])
        .status()?;
    cluster.wait_for("the provisioner to restart the agent", TIMEOUT, || {
        let now = node_pids(st, node);
        Ok(now.len() == 1 && now != before)
    })?;
    cluster.wait_for("the restarted agent to serve /hello again", TIMEOUT, || {
        Ok(get(&nginx_addr, "/hello").is_ok_and(|r| r.status == 200))
    })?;
    hello("after the agent restart")?;

    // kubectl delete pod frees the port.
    cluster.kubectl(&[
        "delete",
        "pod",
        "krustlet-wagi-demo",
        "--wait=true",
        "--timeout=60s",
    ])?;
    cluster.wait_for("the pod port to close", TIMEOUT, || {
        Ok(!listening(&pod_addr))
    })?;
    ensure!(
        get(&nginx_addr, "/hello")?.status == 502,
        "nginx 502 after delete"
    );

    // nodepool delete: no Node, no process, no port.
    let out = nodepool(&cluster, st, &["delete", "mywasipool"])?;
    ok(&out, "nodepool delete")?;
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    nothing_left(
        &cluster,
        st,
        "mywasipool",
        &[format!("127.101.0.1:{kubelet_port}"), pod_addr],
    )?;
    one_line_error(
        &nodepool(&cluster, st, &["show", "mywasipool"])?,
        "not found",
    )?;
    ensure!(nginx.stop(), "nginx stops");
    cluster.down()?;
    Ok(())
}

/// A Deployment of one WAGI pod serving `/hello` on `0.0.0.0:<port>`, in anti-affinity group
/// `spread` (preferred, so that successors may share a node once fewer remain).
fn spread_deployment(name: &str, image: &str, port: u16) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}, group: spread}}
      annotations:
        alpha.wagi.krustlet.dev/default-host: "0.0.0.0:{port}"
        alpha.wagi.krustlet.dev/modules: '{{"hello": {{"route": "/hello/..."}}}}'
    spec:
      terminationGracePeriodSeconds: 5
      nodeSelector:
        kubernetes.io/arch: wasm32-wagi
      tolerations:
        - {{key: kubernetes.io/arch, operator: Equal, value: wasm32-wagi, effect: NoSchedule}}
        - {{key: kubernetes.io/arch, operator: Equal, value: wasm32-wagi, effect: NoExecute}}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels: {{group: spread}}
      containers:
        - name: hello
          image: {image}
"#
    )
}

/// `app -> (pod name, node)` of the Running, ready pods of the spread Deployments.
fn spread_pods(cluster: &Cluster) -> Result<Vec<(String, String, String)>> {
    let pods = cluster.kubectl_json(&["get", "pods", "-l", "group=spread"])?;
    Ok(pods["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["phase"] == "Running"
                && p["status"]["containerStatuses"][0]["ready"] == true
        })
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&p["metadata"]["labels"]["app"]),
                s(&p["metadata"]["name"]),
                s(&p["spec"]["nodeName"]),
            )
        })
        .collect())
}

#[test]
fn three_node_pool_spreads_pods_and_scales_down_gracefully() -> Result<()> {
    let cluster = Cluster::up()?;
    let registry = Registry::start();
    let image = registry.image("hello:v1");
    let push_dir = tempfile::tempdir()?;
    e2e::wasinode::push(&guest("hello")?, &image, push_dir.path(), &[])?;
    let state = tempfile::tempdir()?;
    let st = state.path();
    let _leftovers = Leftovers(st);
    let kubelet_port = free_port().to_string();
    let out = nodepool(
        &cluster,
        st,
        &[
            "add",
            "--name",
            "spread",
            "--node-count",
            "3",
            "--address-base",
            "127.102.0.1",
            "--kubelet-port",
            &kubelet_port,
            "--eviction-hard",
            e2e::agent::EVICTION_HARD,
        ],
    )?;
    let shown: Value = serde_json::from_str(&ok(&out, "nodepool add")?)?;
    ensure!(shown["readyNodes"] == 3, "{shown:#}");
    let nodes = pool_nodes(&cluster, "spread")?;
    ensure!(
        nodes == ["spread-000000", "spread-000001", "spread-000002"],
        "{nodes:?}"
    );

    // Three Deployments in one anti-affinity group: one pod per node.
    let apps = [
        ("web-a", free_port()),
        ("web-b", free_port()),
        ("web-c", free_port()),
    ];
    for (i, (app, port)) in apps.iter().enumerate() {
        cluster.kubectl_stdin(
            &["apply", "-f", "-"],
            &spread_deployment(app, &image, *port),
        )?;
        let waited = cluster.wait_for(&format!("{app} Running"), TIMEOUT, || {
            Ok(spread_pods(&cluster)?.len() == i + 1)
        });
        explained(&cluster, st, waited)?;
    }
    let placed = spread_pods(&cluster)?;
    let mut used: Vec<&str> = placed.iter().map(|(_, _, n)| n.as_str()).collect();
    used.sort_unstable();
    used.dedup();
    ensure!(
        used.len() == 3,
        "anti-affinity spreads over 3 nodes: {placed:?}"
    );
    for (app, _, node) in &placed {
        let port = apps
            .iter()
            .find(|(a, _)| a == app)
            .map(|(_, p)| *p)
            .unwrap_or(0);
        let index: u32 = node.trim_start_matches("spread-").parse()?;
        let addr = format!("127.102.0.{}:{port}", 1 + index);
        let r = get(&addr, "/hello")?;
        ensure!(
            r.status == 200 && r.body == "hello world\n",
            "{app} on {node} at {addr}: {r:?}"
        );
    }

    // A PodDisruptionBudget that forbids evicting the pod on spread-000002 (drained first) holds
    // the scale-down: the node is cordoned, the pod keeps running, and the command says why.
    let (blocked_app, blocked_pod, _) = placed
        .iter()
        .find(|(_, _, n)| n == "spread-000002")
        .cloned()
        .context("a pod on spread-000002")?;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: keep-{blocked_app}}}\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels: {{app: {blocked_app}}}\n"
        ),
    )?;
    cluster.wait_for("the PodDisruptionBudget to count the pod", TIMEOUT, || {
        let pdb = cluster.kubectl_json(&["get", "pdb", &format!("keep-{blocked_app}")])?;
        Ok(pdb["status"]["currentHealthy"] == 1)
    })?;
    let out = nodepool(
        &cluster,
        st,
        &["scale", "spread", "--node-count", "1", "--timeout", "45s"],
    )?;
    one_line_error(&out, "PodDisruptionBudget").with_context(|| provisioner_log(st, "spread"))?;
    let node2 = cluster.kubectl_json(&["get", "node", "spread-000002"])?;
    ensure!(
        node2["spec"]["unschedulable"] == true,
        "spread-000002 is cordoned"
    );
    ensure!(
        spread_pods(&cluster)?
            .iter()
            .any(|(_, p, n)| *p == blocked_pod && n == "spread-000002"),
        "{blocked_pod} still runs on spread-000002"
    );
    cluster.kubectl(&["delete", "pdb", &format!("keep-{blocked_app}")])?;

    // Without it, the scale-down completes: the two other nodes are drained and removed; their
    // pods' successors run on spread-000000 and serve there.
    let out = nodepool(&cluster, st, &["scale", "spread", "--node-count", "1"])?;
    ok(&out, "nodepool scale")?;
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(
        pool_nodes(&cluster, "spread")? == ["spread-000000"],
        "nodes after scale-down: {:?}",
        pool_nodes(&cluster, "spread")?
    );
    let waited = cluster.wait_for("all three apps Running on spread-000000", TIMEOUT, || {
        let pods = spread_pods(&cluster)?;
        Ok(pods.len() == 3 && pods.iter().all(|(_, _, n)| n == "spread-000000"))
    });
    explained(&cluster, st, waited)?;
    for (app, port) in &apps {
        let addr = format!("127.102.0.1:{port}");
        cluster.wait_for(&format!("{app} serving at {addr}"), TIMEOUT, || {
            Ok(get(&addr, "/hello").is_ok_and(|r| r.status == 200 && r.body == "hello world\n"))
        })?;
    }
    // The evictions are on record as the pods' Killing events / replacement pods.
    let moved: Vec<_> = placed
        .iter()
        .filter(|(_, _, n)| n != "spread-000000")
        .map(|(_, pod, _)| pod.clone())
        .collect();
    let names: Vec<String> = spread_pods(&cluster)?
        .into_iter()
        .map(|(_, p, _)| p)
        .collect();
    for pod in &moved {
        ensure!(
            !names.contains(pod),
            "{pod} was evicted and replaced: {names:?}"
        );
    }
    let show: Value = serde_json::from_str(&ok(
        &nodepool(&cluster, st, &["show", "spread"])?,
        "nodepool show",
    )?)?;
    ensure!(show["count"] == 1 && show["readyNodes"] == 1, "{show:#}");

    // Any Kubernetes tool can scale a pool: `kubectl scale` goes through the scale subresource.
    cluster.kubectl(&["scale", "nodepool", "spread", "--replicas", "2"])?;
    cluster.wait_for("spread-000001 back and Ready", TIMEOUT, || {
        let wide = cluster.kubectl(&["get", "nodes"])?;
        Ok(wide.lines().any(|l| {
            l.starts_with("spread-000001 ") && l.split_whitespace().nth(1) == Some("Ready")
        }))
    })?;

    let out = nodepool(&cluster, st, &["delete", "spread"])?;
    ok(&out, "nodepool delete")?;
    let addrs: Vec<String> = (1..=3)
        .map(|i| format!("127.102.0.{i}:{kubelet_port}"))
        .chain(apps.iter().map(|(_, p)| format!("127.102.0.1:{p}")))
        .collect();
    nothing_left(&cluster, st, "spread", &addrs)?;
    cluster.down()?;
    Ok(())
}
