//! Container logs of `wasinode node` over weeks of pod churn and chatty guests, each on its own
//! real control plane (kube-apiserver, kube-scheduler, kube-controller-manager, etcd), with the
//! guests pushed to the test registry and read back with `kubectl logs`:
//! - pods at rest hold no log descriptor, and deleted pods give back every one (the agent's
//!   `/proc/<pid>/fd` returns to its baseline) and their log folders are gone for good;
//! - a guest printing in a tight loop while the log writer cannot keep up (a slow disk, made
//!   with the testing-only `--container-log-write-rate`) loses its own lines, and its log says
//!   how many; the agent's memory stays bounded, a WAGI pod keeps answering and another pod's
//!   lines are all kept;
//! - with a small `--container-log-max-size` the files rotate, at most
//!   `--container-log-max-files` are kept, and `kubectl logs` (all, `--tail`, `-f`, `--previous`)
//!   reads across the rotation without a gap or a repeated line.
//!
//! Run: `cargo build --release && cargo test --release -p wasinode-e2e --test node_logs`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::agent::{Agent, AgentOptions, TOLERATIONS, hello_pod, wagi_pod};
use e2e::cluster::Cluster;
use e2e::registry::Registry;
use e2e::wasinode::{free_port, get};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A control plane, a registry and one Ready agent.
fn node(opts: AgentOptions) -> Result<(Cluster, Registry, Agent)> {
    let registry = Registry::start();
    let cluster = Cluster::up()?;
    let agent = Agent::start_ready(&cluster, opts, TIMEOUT)?;
    Ok((cluster, registry, agent))
}

/// A `log_lines` WASI command pod (container `main`) with the given environment, labelled
/// `app=<app>`.
fn log_pod(name: &str, app: &str, image: &str, env: &[(&str, &str)], restart: &str) -> Value {
    let env: Vec<Value> = env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {
            "nodeSelector": {"kubernetes.io/arch": "wasm32-wagi"},
            "tolerations": serde_json::from_str::<Value>(TOLERATIONS).unwrap_or(Value::Null),
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": image, "env": env}],
        },
    })
}

fn apply_all(cluster: &Cluster, items: Vec<Value>) -> Result<()> {
    cluster.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

/// `(name, uid, phase)` of the pods labelled `app=<app>`.
fn pods(cluster: &Cluster, app: &str) -> Result<Vec<(String, String, String)>> {
    let list =
        cluster.kubectl_json(&["get", "pods", "-n", "default", "-l", &format!("app={app}")])?;
    Ok(list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|p| {
                    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                    (
                        s(&p["metadata"]["name"]),
                        s(&p["metadata"]["uid"]),
                        s(&p["status"]["phase"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

fn logs_dir(agent: &Agent) -> PathBuf {
    agent.data_dir.join("logs")
}

fn pod_log_dir(agent: &Agent, name: &str, uid: &str) -> PathBuf {
    logs_dir(agent).join(format!("default_{name}_{uid}"))
}

/// The agent's open descriptors: all of them, and the targets of those under `under`.
fn fds(agent: &Agent, under: &Path) -> Result<(usize, Vec<String>)> {
    let pid = agent.pid().context("agent not running")?;
    let mut all = 0;
    let mut inside = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(e) = e else { continue };
        all += 1;
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy().into_owned();
            if t.starts_with(&*under.to_string_lossy()) {
                inside.push(t);
            }
        }
    }
    Ok((all, inside))
}

fn kubectl_logs(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let mut all = vec!["logs", "-n", "default"];
    all.extend_from_slice(args);
    cluster.kubectl(&all)
}

/// The numbers of the `line <n>` lines of `text`, in order.
fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("line "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

fn contiguous(ns: &[u64]) -> bool {
    ns.windows(2).all(|w| w[1] == w[0] + 1)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn idle_and_deleted_pods_hold_no_log_descriptors() -> Result<()> {
    let (cluster, registry, agent) = node(AgentOptions::new("wasi-log-fds"))?;
    let image = registry.push_guest("log_lines")?;
    let logs = logs_dir(&agent);

    // A first pod pulls, compiles and opens what the agent keeps anyway.
    cluster.apply(&log_pod("warm-up", "warm", &image, &[], "Always"))?;
    cluster
        .wait_for("warm-up logged", TIMEOUT, || {
            Ok(kubectl_logs(&cluster, &["warm-up"])
                .unwrap_or_default()
                .contains("done 3"))
        })
        .with_context(|| agent.output())?;
    cluster.delete_pod("warm-up", TIMEOUT)?;
    let (baseline, _) = fds(&agent, &logs)?;

    // 30 pods that log a few lines and then rest, 30 that keep logging.
    let resting: Vec<Value> = (0..30)
        .map(|i| {
            log_pod(
                &format!("rest-{i}"),
                "churn",
                &image,
                &[("LINES", "5")],
                "Always",
            )
        })
        .collect();
    let chatty: Vec<Value> = (0..30)
        .map(|i| {
            log_pod(
                &format!("chat-{i}"),
                "churn",
                &image,
                &[("LINES", "100000000"), ("EVERY_MS", "100")],
                "Always",
            )
        })
        .collect();
    apply_all(&cluster, resting)?;
    let mut logged = Vec::new();
    cluster
        .wait_for(
            "the 30 resting pods to have logged all their lines",
            TIMEOUT,
            || {
                let ps = pods(&cluster, "churn")?;
                logged = ps
                    .iter()
                    .filter(|(_, uid, _)| !uid.is_empty())
                    .map(|(name, uid, _)| pod_log_dir(&agent, name, uid))
                    .collect();
                Ok(ps.len() == 30
                    && logged.iter().all(|d| {
                        std::fs::read_to_string(d.join("main.log"))
                            .is_ok_and(|t| t.contains("done 5"))
                    }))
            },
        )
        .with_context(|| agent.output())?;

    // At rest, their log files are closed.
    cluster
        .wait_for("no log file open while the pods rest", TIMEOUT, || {
            Ok(fds(&agent, &logs)?.1.is_empty())
        })
        .with_context(|| format!("open: {:?}", fds(&agent, &logs).map(|f| f.1)))?;

    apply_all(&cluster, chatty)?;
    cluster
        .wait_for("the 30 chatty pods to be logging", TIMEOUT, || {
            let ps = pods(&cluster, "churn")?;
            Ok(ps.len() == 60
                && ps.iter().all(|(name, uid, _)| {
                    std::fs::metadata(pod_log_dir(&agent, name, uid).join("main.log"))
                        .is_ok_and(|m| m.len() > 0)
                }))
        })
        .with_context(|| agent.output())?;
    let dirs: Vec<PathBuf> = pods(&cluster, "churn")?
        .iter()
        .map(|(name, uid, _)| pod_log_dir(&agent, name, uid))
        .collect();
    let (with_pods, open) = fds(&agent, &logs)?;
    eprintln!(
        "agent descriptors: {baseline} at baseline, {with_pods} with 60 pods ({} log files open)",
        open.len()
    );

    cluster.kubectl(&[
        "delete",
        "pods",
        "-n",
        "default",
        "-l",
        "app=churn",
        "--wait=false",
    ])?;
    cluster.wait_for("every pod to be gone", TIMEOUT, || {
        Ok(pods(&cluster, "churn")?.is_empty())
    })?;
    cluster
        .wait_for(
            "the agent's descriptors back to their baseline, no log file open",
            // Pooled API connections opened for the 60 pods' status writes idle out in 90 s.
            Duration::from_secs(180),
            || {
                let (n, open) = fds(&agent, &logs)?;
                Ok(n <= baseline + 3 && open.is_empty())
            },
        )
        .with_context(|| format!("baseline {baseline}, now {:?}", fds(&agent, &logs)))?;
    // Their space is freed: the folders are gone, and no late line brought one back.
    let left: Vec<&PathBuf> = dirs.iter().filter(|d| d.exists()).collect();
    ensure!(left.is_empty(), "log folders left behind: {left:?}");
    Ok(())
}

#[test]
fn a_spamming_pod_loses_its_own_lines_not_the_nodes_memory_or_other_pods() -> Result<()> {
    // A writer that keeps up with 1 MiB/s only, as on a slow disk.
    let (cluster, registry, mut agent) =
        node(AgentOptions::new("wasi-log-spam").args(&["--container-log-write-rate", "1MiB"]))?;
    let spam = registry.push_guest("log_lines")?;
    let hello_addr = format!("127.0.0.1:{}", free_port());
    let log_addr = format!("127.0.0.1:{}", free_port());
    cluster.apply(&hello_pod(
        "hello",
        &hello_addr,
        &registry.push_guest("hello")?,
    ))?;
    cluster.apply(&wagi_pod(
        "other",
        &log_addr,
        r#"{"hello": {"route": "/log"}}"#,
        &registry.push_guest("log")?,
        true,
    ))?;
    agent.wait_listening(&hello_addr, TIMEOUT)?;
    agent.wait_listening(&log_addr, TIMEOUT)?;
    let rss_before = agent.rss_kib()?;

    cluster.apply(&log_pod(
        "spammer",
        "spam",
        &spam,
        &[("LINES", "1000000000"), ("PAD", "200")],
        "Never",
    ))?;
    let mut max_rss = rss_before;
    let mut answered = 0;
    let mut check = |agent: &Agent| -> Result<()> {
        for _ in 0..10 {
            let resp = get(&hello_addr, "/hello")?;
            ensure!(
                resp.status == 200,
                "GET /hello while the spammer runs: {resp:?}"
            );
            answered += 1;
        }
        max_rss = max_rss.max(agent.rss_kib()?);
        Ok(())
    };
    let note = "lines dropped (log writer behind)";
    cluster
        .wait_for(
            "the spammer's log to say lines were dropped",
            TIMEOUT,
            || {
                check(&agent)?;
                Ok(kubectl_logs(&cluster, &["spammer", "--tail=20"])
                    .unwrap_or_default()
                    .contains(note))
            },
        )
        .with_context(|| agent.output())?;
    // It keeps spamming (several MiB more reach its files): the other pods keep working and the
    // agent's memory stays bounded.
    let spam_uid = cluster.pod("spammer")?["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spam_dir = pod_log_dir(&agent, "spammer", &spam_uid);
    let written = || -> u64 {
        std::fs::read_dir(&spam_dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    let start = written();
    let mut i = 0;
    cluster.wait_for("4 MiB more of the spammer's log written", TIMEOUT, || {
        check(&agent)?;
        let resp = get(&log_addr, &format!("/log?n{i}"))?;
        ensure!(resp.status == 200, "GET /log: {resp:?}");
        i += 1;
        Ok(written() >= start + (4 << 20))
    })?;
    let sent = i;
    let p = cluster.pod("spammer")?;
    ensure!(
        p["status"]["phase"] == "Running",
        "the spammer stopped: {}",
        p["status"]
    );
    let tail = kubectl_logs(&cluster, &["spammer", "--tail=200"])?;
    let dropped: Vec<u64> = tail
        .lines()
        .filter_map(|l| {
            l.strip_prefix("wasinode: ")?
                .strip_suffix(note)?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    ensure!(
        dropped.iter().any(|n| *n > 0),
        "no drop count in the spammer's log:\n{tail}"
    );
    let last = format!("query=n{}", sent - 1);
    cluster.wait_for("every line of the other pod in its log", TIMEOUT, || {
        Ok(kubectl_logs(&cluster, &["other"])?.contains(&last))
    })?;
    let other = kubectl_logs(&cluster, &["other"])?;
    for i in 0..sent {
        ensure!(
            other.contains(&format!("query=n{i}\n")),
            "the other pod lost query=n{i}:\n{other}"
        );
    }
    ensure!(
        !other.contains(note),
        "the other pod dropped lines:\n{other}"
    );
    eprintln!(
        "agent RSS: {} MiB before the spammer, at most {} MiB while it ran ({answered} requests \
         answered, drops noted: {dropped:?})",
        rss_before / 1024,
        max_rss / 1024
    );
    // What waits for the log writer is bounded by 32 MiB (1 MiB per container).
    ensure!(
        max_rss < rss_before + 64 * 1024,
        "agent RSS grew from {rss_before} KiB to {max_rss} KiB"
    );
    Ok(())
}

#[test]
fn logs_rotate_and_kubectl_logs_reads_across_the_rotation() -> Result<()> {
    let (cluster, registry, agent) = node(AgentOptions::new("wasi-log-rotate").args(&[
        "--container-log-max-size",
        "4KiB",
        "--container-log-max-files",
        "3",
        "--restart-backoff",
        "1s",
    ]))?;
    let image = registry.push_guest("log_lines")?;

    // 1000 lines of ~45 bytes on disk each: more than ten files' worth.
    cluster.apply(&log_pod(
        "filler",
        "rotate",
        &image,
        &[("LINES", "1000")],
        "Always",
    ))?;
    cluster
        .wait_for("filler logged every line", TIMEOUT, || {
            Ok(
                kubectl_logs(&cluster, &["filler", "--tail=1"]).unwrap_or_default()
                    == "done 1000\n",
            )
        })
        .with_context(|| agent.output())?;
    let uid = cluster.pod("filler")?["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let dir = pod_log_dir(&agent, "filler", &uid);
    let mut files: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    files.sort();
    ensure!(
        files.len() == 3
            && files[0] == "main.log"
            && files[1..].iter().all(|f| f.starts_with("main.log.20")),
        "files: {files:?}"
    );
    for f in &files {
        let size = std::fs::metadata(dir.join(f))?.len();
        ensure!(size <= 4096, "{f} has {size} bytes");
    }
    let tail = kubectl_logs(&cluster, &["filler", "--tail=100"])?;
    ensure!(
        numbers(&tail) == (901..1000).collect::<Vec<_>>()
            && tail.ends_with("line 0000999\ndone 1000\n"),
        "kubectl logs --tail=100:\n{tail}"
    );
    let all = kubectl_logs(&cluster, &["filler"])?;
    let ns = numbers(&all);
    ensure!(
        contiguous(&ns) && ns.last() == Some(&999) && ns.len() > 100 && ns[0] > 0,
        "kubectl logs (three files of 4 KiB):\n{all}"
    );

    // -f while the pod logs: every line once and in order, across several rotations.
    cluster.apply(&log_pod(
        "slow",
        "rotate",
        &image,
        &[("LINES", "1000"), ("EVERY_MS", "10")],
        "Always",
    ))?;
    let out = tempfile::NamedTempFile::new()?;
    let mut follow = Command::new(&cluster.kubectl_path)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(["logs", "-f", "slow", "-n", "default"])
        .stdout(std::fs::File::create(out.path())?)
        .stderr(Stdio::null())
        .spawn()?;
    let followed = cluster.wait_for("kubectl logs -f to show the last line", TIMEOUT, || {
        if follow.try_wait()?.is_some() {
            // Started before the container: kubectl gave up; follow again.
            follow = Command::new(&cluster.kubectl_path)
                .arg("--kubeconfig")
                .arg(cluster.kubeconfig())
                .args(["logs", "-f", "slow", "-n", "default"])
                .stdout(std::fs::File::create(out.path())?)
                .stderr(Stdio::null())
                .spawn()?;
        }
        Ok(std::fs::read_to_string(out.path())?.contains("done 1000"))
    });
    let _ = follow.kill();
    let _ = follow.wait();
    followed.with_context(|| agent.output())?;
    let text = std::fs::read_to_string(out.path())?;
    let ns = numbers(&text);
    ensure!(
        contiguous(&ns) && ns.last() == Some(&999) && ns.len() > 300,
        "kubectl logs -f:\n{text}"
    );

    // --previous: the run before a restart, across its rotated files too.
    cluster.apply(&log_pod(
        "crasher",
        "rotate",
        &image,
        &[("LINES", "300"), ("REST_S", "0"), ("EXIT_CODE", "1")],
        "Always",
    ))?;
    cluster
        .wait_for("kubectl logs --previous of the crasher", TIMEOUT, || {
            let p = cluster.pod("crasher")?;
            if p["status"]["containerStatuses"][0]["restartCount"]
                .as_u64()
                .unwrap_or(0)
                < 1
            {
                return Ok(false);
            }
            let prev = kubectl_logs(&cluster, &["crasher", "--previous", "--tail=151"])
                .unwrap_or_default();
            Ok(numbers(&prev) == (150..300).collect::<Vec<_>>() && prev.ends_with("done 300\n"))
        })
        .with_context(|| agent.output())?;
    Ok(())
}
