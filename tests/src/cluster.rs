//! A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler on loopback, started by `tools/cluster up DIR` in a temporary directory and
//! stopped by `tools/cluster down DIR` when the [`Cluster`] is dropped, which also happens when a
//! test panics. The first use on a machine builds Kubernetes from the Go module proxy (cached under
//! `~/.cache/wasinode`; see `tools/cluster`); `tools/cluster build` does that ahead of time.
//!
//! ```no_run
//! let cluster = e2e::cluster::Cluster::up()?;
//! assert_eq!(cluster.kubectl(&["get", "--raw", "/readyz"])?, "ok");
//! # anyhow::Ok(())
//! ```
//!
//! If a test panics, the directory (PKI, kubeconfigs, the components' logs) is kept and its path
//! printed; set `WASINODE_KEEP_CLUSTER=1` to keep it always.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The components `tools/cluster up` starts; each writes `DIR/<name>.log`.
pub const COMPONENTS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// The repository root (the parent of this crate's directory).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The path of the `tools/cluster` script.
pub fn script() -> PathBuf {
    repo_root().join("tools/cluster")
}

/// Builds (or finds in the cache) the Kubernetes control-plane binary; returns its path.
pub fn build() -> Result<PathBuf> {
    let out = Command::new(script())
        .arg("build")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running tools/cluster build")?;
    if !out.status.success() {
        bail!("tools/cluster build failed ({})", out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A running control plane. Dropping it stops every process `tools/cluster up` started.
pub struct Cluster {
    /// The cluster directory: `admin.kubeconfig`, `bootstrap.kubeconfig`, `ca.crt`, `env`,
    /// `pki/`, `pids/` and one `<component>.log` per process.
    pub dir: PathBuf,
    /// The API server's URL, e.g. `https://127.0.0.1:41234`.
    pub api_server: String,
    /// The kubectl every test and benchmark runs: `$KUBECTL` if set, else the one built with the
    /// control plane from the same Kubernetes release (`tools/cluster`'s `find_kubectl`, the one
    /// rule, written into the cluster's `env` file).
    pub kubectl_path: PathBuf,
    tmp: Option<tempfile::TempDir>,
    stopped: bool,
}

impl Cluster {
    /// Starts a control plane in a new temporary directory (removed again on drop).
    pub fn up() -> Result<Cluster> {
        let tmp = tempfile::Builder::new()
            .prefix("wasinode-cluster-")
            .tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut cluster = Cluster::start(&dir)?;
        cluster.tmp = Some(tmp);
        Ok(cluster)
    }

    /// Starts a control plane in `dir` (created if needed, left in place on drop).
    pub fn up_in(dir: &Path) -> Result<Cluster> {
        Cluster::start(dir)
    }

    fn start(dir: &Path) -> Result<Cluster> {
        let started = Instant::now();
        // Progress (and, on a cold machine, the long Kubernetes build) goes to our stderr.
        let status = Command::new(script())
            .arg("up")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .context("running tools/cluster up")?;
        if !status.success() {
            // `up` stops what it started when it fails; keep nothing running either way.
            let _ = run_down(dir);
            bail!(
                "tools/cluster up {} failed ({status}); component logs:\n{}",
                dir.display(),
                log_tails(dir, 30)
            );
        }
        let env =
            std::fs::read_to_string(dir.join("env")).context("reading the cluster's env file")?;
        let var = |name: &str| -> Result<String> {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(|v| v.trim_matches('\'').to_string())
                .with_context(|| format!("{name} missing from {}/env", dir.display()))
        };
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            api_server: var("WASINODE_API_SERVER")?,
            kubectl_path: PathBuf::from(var("KUBECTL")?),
            tmp: None,
            stopped: false,
        };
        eprintln!(
            "cluster: up at {} in {:.1}s (dir {})",
            cluster.api_server,
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(cluster)
    }

    /// The admin kubeconfig (client certificate in group `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A kubeconfig holding the bootstrap token (group `system:bootstrappers`), allowed to create
    /// node client CSRs, which the controller-manager auto-approves and signs.
    pub fn bootstrap_kubeconfig(&self) -> PathBuf {
        self.dir.join("bootstrap.kubeconfig")
    }

    /// The cluster CA certificate (client CA of the API server and signer of all CSRs).
    pub fn ca_crt(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The shell-sourceable `env` file (KUBECONFIG, KUBECTL, WASINODE_API_SERVER, ...).
    pub fn env_file(&self) -> PathBuf {
        self.dir.join("env")
    }

    /// The log file of one of [`COMPONENTS`].
    pub fn log(&self, component: &str) -> PathBuf {
        self.dir.join(format!("{component}.log"))
    }

    /// Runs kubectl with the admin kubeconfig; returns its stdout. The error includes stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with(&self.kubeconfig(), args, None)
    }

    /// Like [`Cluster::kubectl`], with `stdin` fed to kubectl (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        self.kubectl_with(&self.kubeconfig(), args, Some(stdin))
    }

    /// Runs kubectl with the admin kubeconfig and `-o json` appended; parses the output.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let out = self.kubectl(&args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("parsing the output of kubectl {}", args.join(" ")))
    }

    /// Runs kubectl with another kubeconfig (e.g. [`Cluster::bootstrap_kubeconfig`]).
    pub fn kubectl_with(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String> {
        let mut cmd = Command::new(&self.kubectl_path);
        cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", self.kubectl_path.display()))?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Polls `check` every 500 ms until it returns `Ok(true)`; see [`wait_for`].
    pub fn wait_for(
        &self,
        desc: &str,
        timeout: Duration,
        check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        wait_for(desc, timeout, check)
    }

    /// `kubectl apply -f -` of one object.
    pub fn apply(&self, obj: &serde_json::Value) -> Result<()> {
        self.kubectl_stdin(&["apply", "-f", "-"], &obj.to_string())?;
        Ok(())
    }

    /// The pod `default/<name>` as JSON.
    pub fn pod(&self, name: &str) -> Result<serde_json::Value> {
        self.kubectl_json(&["get", "pod", name, "-n", "default"])
    }

    /// `kubectl describe pod <name>` in `default`.
    pub fn describe_pod(&self, name: &str) -> Result<String> {
        self.kubectl(&["describe", "pod", name, "-n", "default"])
    }

    /// The Events about the pod `default/<name>`, as JSON, oldest first.
    pub fn pod_event_items(&self, name: &str) -> Result<Vec<serde_json::Value>> {
        let selector = format!("involvedObject.name={name}");
        let list = self.kubectl_json(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            &selector,
        ])?;
        let mut items = list["items"].as_array().cloned().unwrap_or_default();
        items.sort_by_key(|e| {
            e["metadata"]["creationTimestamp"]
                .as_str()
                .map(String::from)
        });
        Ok(items)
    }

    /// The Events about the pod `default/<name>` as `(type, reason, message)`, oldest first.
    pub fn pod_events(&self, name: &str) -> Result<Vec<(String, String, String)>> {
        let field = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
        Ok(self
            .pod_event_items(name)?
            .iter()
            .map(|e| (field(e, "type"), field(e, "reason"), field(e, "message")))
            .collect())
    }

    /// Waits until the pod `default/<name>` is Running with its Ready condition True.
    pub fn wait_pod_running(&self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_for(&format!("{name} Running and Ready"), timeout, || {
            let p = self.pod(name)?;
            let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            Ok(p["status"]["phase"] == "Running" && ready)
        })
    }

    /// Waits until the pod `default/<name>` has an Event of type `kind` and `reason` whose
    /// message contains every one of `words`.
    pub fn wait_pod_event(
        &self,
        pod: &str,
        kind: &str,
        reason: &str,
        words: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        self.wait_for(
            &format!("a {kind} {reason} Event about {pod} with {words:?}"),
            timeout,
            || {
                Ok(self.pod_events(pod)?.iter().any(|(t, r, m)| {
                    t == kind && r == reason && words.iter().all(|w| m.contains(w))
                }))
            },
        )
    }

    /// `spec.renewTime` of the node's Lease in `kube-node-lease` (RFC 3339 with microseconds, so
    /// later renewals compare greater as text).
    pub fn lease_renew_time(&self, node: &str) -> Result<String> {
        let lease = self.kubectl_json(&["get", "lease", node, "-n", "kube-node-lease"])?;
        Ok(lease["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Whether the pod `default/<name>` exists.
    pub fn pod_exists(&self, name: &str) -> Result<bool> {
        let names = self.kubectl(&["get", "pods", "-n", "default", "-o", "name"])?;
        Ok(names.lines().any(|l| l == format!("pod/{name}")))
    }

    /// `kubectl delete pod <name> --wait=false`, then waits until the object is gone.
    pub fn delete_pod(&self, name: &str, timeout: Duration) -> Result<()> {
        self.kubectl(&["delete", "pod", name, "-n", "default", "--wait=false"])?;
        self.wait_for(&format!("pod {name} to disappear"), timeout, || {
            Ok(!self.pod_exists(name)?)
        })
    }

    /// Stops one component (e.g. `kube-apiserver`) alone, as an outage would; its command line
    /// is kept so that [`Cluster::start_component`] starts it again as it was.
    pub fn stop_component(&self, name: &str) -> Result<()> {
        let pids = self.dir.join("pids").join(name);
        let record = std::fs::read_to_string(&pids)
            .with_context(|| format!("{name} is not running ({})", pids.display()))?;
        let pid: u32 = record
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("bad pid record {record:?}"))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("{name} (pid {pid}) is gone"))?;
        std::fs::write(self.dir.join(format!("{name}.cmdline")), &cmdline)?;
        // Its process group, as `tools/cluster down` does; SIGKILL when it drains its
        // connections for longer than 5 s (kube-apiserver waits for its watches).
        let group = format!("-{pid}");
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        if wait_for(&format!("{name} to exit"), Duration::from_secs(5), || {
            Ok(!pid_alive(pid))
        })
        .is_err()
        {
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            wait_for(&format!("{name} to exit"), Duration::from_secs(10), || {
                Ok(!pid_alive(pid))
            })?;
        }
        std::fs::remove_file(&pids)?;
        Ok(())
    }

    /// Starts a component that [`Cluster::stop_component`] stopped, with the same command line
    /// (so the same ports), in its own session, its output appended to its log; `down` stops it.
    /// For `kube-apiserver`, waits until `/readyz` answers ok.
    pub fn start_component(&self, name: &str) -> Result<()> {
        let cmdline = std::fs::read(self.dir.join(format!("{name}.cmdline")))
            .with_context(|| format!("{name} was not stopped by stop_component"))?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let log = self.log(name);
        // `sh` backgrounds it and exits at once, so the component is not our child (no zombie
        // for `down` to wait on).
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 & echo $!"#)
            .arg("sh")
            .arg(&log)
            .args(&args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()?;
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("starting {name}: no pid from sh"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("{name} (pid {pid}) exited at once; see {}", log.display()))?;
        let start_time = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .unwrap_or("0");
        std::fs::write(
            self.dir.join("pids").join(name),
            format!("{pid} {start_time}\n"),
        )?;
        if name == "kube-apiserver" {
            self.wait_for("kube-apiserver /readyz", Duration::from_secs(120), || {
                Ok(self.kubectl(&["get", "--raw", "/readyz"])?.trim() == "ok")
            })?;
        }
        Ok(())
    }

    /// Stops the control plane now (instead of on drop), reporting failure.
    pub fn down(mut self) -> Result<()> {
        self.stopped = true;
        run_down(&self.dir)
    }
}

/// Polls `check` every 500 ms until it returns `Ok(true)`. `Ok(false)` and `Err` both mean "not
/// yet" (the object may not exist yet); after `timeout` the error names `desc` and carries the
/// last error `check` returned.
pub fn wait_for(
    desc: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {desc}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {desc}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

fn run_down(dir: &Path) -> Result<()> {
    let status = Command::new(script())
        .arg("down")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .context("running tools/cluster down")?;
    if !status.success() {
        bail!("tools/cluster down {} failed ({status})", dir.display());
    }
    Ok(())
}

/// The last `n` lines of each component's log in `dir`.
fn log_tails(dir: &Path, n: usize) -> String {
    let mut out = String::new();
    for c in COMPONENTS {
        let path = dir.join(format!("{c}.log"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last {n} lines)\n", path.display()));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            if let Err(e) = run_down(&self.dir) {
                eprintln!("cluster: {e:#}");
            }
        }
        let keep = std::env::var_os("WASINODE_KEEP_CLUSTER").is_some_and(|v| v != "0");
        if std::thread::panicking() || keep {
            if std::thread::panicking() {
                eprintln!(
                    "cluster: a test failed; component logs:\n{}",
                    log_tails(&self.dir, 20)
                );
            }
            if let Some(tmp) = self.tmp.take() {
                let _ = tmp.keep();
            }
            eprintln!(
                "cluster: kept {} (logs, PKI, kubeconfigs)",
                self.dir.display()
            );
        }
    }
}
