//! A real metrics-server (built from its Go module by `tools/cluster metrics-server`, cached outside
//! the repo) run as a host process beside a [`Cluster`], registered with the API server's
//! aggregation layer as `v1beta1.metrics.k8s.io`, so that `kubectl top` and the
//! HorizontalPodAutoscaler controller read the metrics it scrapes from the nodes' kubelet API
//! (`/metrics/resource`). Killed on drop.
//!
//! ```no_run
//! # use e2e::{cluster::Cluster, metrics_server::MetricsServer, netns::NetNs};
//! let cluster = Cluster::up()?;
//! let net = NetNs::new()?; // the API server refuses loopback endpoint addresses
//! let mut ms = MetricsServer::start(&cluster, net.host_ip.into())?;
//! ms.wait_available(&cluster, std::time::Duration::from_secs(60))?;
//! println!("{}", cluster.kubectl(&["top", "node"])?);
//! # anyhow::Ok(())
//! ```
//!
//! How it is wired, as a cluster operator would (upstream's components.yaml, less the Deployment):
//! - identity: a client certificate `CN=metrics-server` from the cluster CA in its kubeconfig, used
//!   for the API server and for the kubelets; RBAC: `system:metrics-server` (nodes/metrics, pods
//!   and nodes), `system:auth-delegator` (TokenReviews and SubjectAccessReviews for its callers)
//!   and `extension-apiserver-authentication-reader` in kube-system (the front-proxy CA that
//!   `tools/cluster up` configures), plus `system:aggregated-metrics-reader` for the view roles;
//! - serving: a certificate from the cluster CA for `metrics-server.kube-system.svc` and the bind
//!   address; the APIService's `caBundle` is the cluster CA, so the aggregator verifies it;
//! - reachability: the Service `kube-system/metrics-server` has no selector and Endpoints written
//!   here with the bind address (the API server runs with `--enable-aggregator-routing`, so it
//!   dials that address; it refuses loopback addresses, hence a veth address from
//!   [`crate::netns::NetNs`]);
//! - kubelets: their `InternalIP` and the port of their Node's `daemonEndpoints`, serving
//!   certificates verified against the cluster CA (`--kubelet-certificate-authority`): a node's
//!   `kubelet-serving` CSR must be approved first (its self-signed certificate is refused);
//! - `--metric-resolution 10s`, the least it allows (and a 5 s kubelet request timeout, which
//!   must stay under 90% of it).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cluster::Cluster;

/// The name of the APIService metrics-server serves.
pub const API_SERVICE: &str = "v1beta1.metrics.k8s.io";

/// Builds (or finds in the cache) metrics-server; returns its path.
pub fn build() -> Result<PathBuf> {
    let out = Command::new(crate::cluster::script())
        .arg("metrics-server")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running tools/cluster metrics-server")?;
    if !out.status.success() {
        bail!("tools/cluster metrics-server failed ({})", out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A running metrics-server process (killed on drop) and the objects that register it.
pub struct MetricsServer {
    /// Where it serves (HTTPS), the address of its Endpoints.
    pub addr: SocketAddr,
    /// Its PKI, kubeconfig and log (`metrics-server.log`), inside the cluster's directory.
    pub dir: PathBuf,
    child: Child,
}

impl MetricsServer {
    /// Writes its certificates and kubeconfig, applies its RBAC, Service, Endpoints and
    /// APIService, and starts it listening on `ip` (not loopback: the API server refuses
    /// loopback endpoints). Does not wait; see [`MetricsServer::wait_available`].
    pub fn start(cluster: &Cluster, ip: IpAddr) -> Result<MetricsServer> {
        let bin = build()?;
        let dir = cluster.dir.join("metrics-server");
        std::fs::create_dir_all(&dir)?;
        let port = free_port(ip)?;
        let addr = SocketAddr::new(ip, port);
        let ca = cluster.dir.join("pki");
        let ip_san = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => v6.to_string(),
        };
        gen_cert(
            &ca,
            &dir,
            "client",
            "/CN=metrics-server",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )?;
        gen_cert(
            &ca,
            &dir,
            "serving",
            "/CN=metrics-server",
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:metrics-server.kube-system.svc,DNS:metrics-server.kube-system.svc.cluster.local,IP:{ip_san}\n"
            ),
        )?;
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(cluster, &dir, &kubeconfig)?;
        cluster.kubectl_stdin(&["apply", "-f", "-"], &objects(cluster, addr)?.to_string())?;

        let log = dir.join("metrics-server.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(&bin)
            .arg("--bind-address")
            .arg(ip.to_string())
            .arg("--secure-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(dir.join("serving.crt"))
            .arg("--tls-private-key-file")
            .arg(dir.join("serving.key"))
            .arg("--cert-dir")
            .arg(dir.join("certs"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--authentication-kubeconfig")
            .arg(&kubeconfig)
            .arg("--authorization-kubeconfig")
            .arg(&kubeconfig)
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--kubelet-use-node-status-port")
            .arg("--kubelet-certificate-authority")
            .arg(cluster.ca_crt())
            .arg("--metric-resolution=10s")
            .arg("--kubelet-request-timeout=5s")
            .arg("--profiling=false")
            // V(1) says why a node's or pod's metrics were dropped (incomplete series).
            .arg("--v=1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(MetricsServer { addr, dir, child })
    }

    /// Waits until the APIService is Available (the aggregator reached metrics-server through
    /// its Endpoints and verified it); fails early if metrics-server exits.
    pub fn wait_available(&mut self, cluster: &Cluster, timeout: Duration) -> Result<()> {
        cluster
            .wait_for(
                "APIService v1beta1.metrics.k8s.io Available",
                timeout,
                || {
                    if let Some(status) = self.child.try_wait()? {
                        bail!("metrics-server exited ({status})");
                    }
                    let svc = cluster.kubectl_json(&["get", "apiservice", API_SERVICE])?;
                    Ok(condition_true(&svc, "Available"))
                },
            )
            .with_context(|| self.output())
    }

    /// The last lines metrics-server logged (at most 60).
    pub fn output(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("metrics-server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!("--- metrics-server log (last 60 lines)\n{tail}")
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `obj.status.conditions` has `type` with status "True".
pub fn condition_true(obj: &Value, ty: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == ty && c["status"] == "True"))
}

/// A port nobody listens on at `ip` right now.
fn free_port(ip: IpAddr) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(l.local_addr()?.port())
}

/// `NAME.key` (EC P-256) and `NAME.crt` in `dir`, signed by `ca_dir/ca.{crt,key}` (the cluster
/// CA that `tools/cluster up` made), with the X.509 extensions `ext`.
fn gen_cert(ca_dir: &Path, dir: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let crt = dir.join(format!("{name}.crt"));
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext)?;
    let openssl = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    openssl(&[
        os("ecparam"),
        os("-name"),
        os("prime256v1"),
        os("-genkey"),
        os("-noout"),
        os("-out"),
        key.as_os_str(),
    ])?;
    openssl(&[
        os("req"),
        os("-new"),
        os("-key"),
        key.as_os_str(),
        os("-subj"),
        std::ffi::OsStr::new(subject),
        os("-out"),
        csr.as_os_str(),
    ])?;
    let (ca_crt, ca_key, serial) = (
        ca_dir.join("ca.crt"),
        ca_dir.join("ca.key"),
        dir.join("ca.srl"),
    );
    openssl(&[
        os("x509"),
        os("-req"),
        os("-in"),
        csr.as_os_str(),
        os("-CA"),
        ca_crt.as_os_str(),
        os("-CAkey"),
        ca_key.as_os_str(),
        os("-CAserial"),
        serial.as_os_str(),
        os("-CAcreateserial"),
        os("-days"),
        os("2"),
        os("-sha256"),
        os("-extfile"),
        ext_file.as_os_str(),
        os("-out"),
        crt.as_os_str(),
    ])?;
    let _ = std::fs::remove_file(&csr);
    let _ = std::fs::remove_file(&ext_file);
    Ok(())
}

fn write_kubeconfig(cluster: &Cluster, dir: &Path, path: &Path) -> Result<()> {
    let b64 = |p: PathBuf| -> Result<String> {
        Ok(crate::registry::base64(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        ))
    };
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "wasinode", "cluster": {
            "server": cluster.api_server,
            "certificate-authority-data": b64(cluster.ca_crt())?,
        }}],
        "users": [{"name": "metrics-server", "user": {
            "client-certificate-data": b64(dir.join("client.crt"))?,
            "client-key-data": b64(dir.join("client.key"))?,
        }}],
        "contexts": [{"name": "metrics-server", "context": {"cluster": "wasinode", "user": "metrics-server"}}],
        "current-context": "metrics-server",
    });
    // JSON is YAML, which is what client-go reads.
    std::fs::write(path, config.to_string())?;
    Ok(())
}

/// RBAC, Service, Endpoints and APIService, as one List for `kubectl apply`.
fn objects(cluster: &Cluster, addr: SocketAddr) -> Result<Value> {
    let user = json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "metrics-server"}]);
    let ca_bundle = crate::registry::base64(&std::fs::read(cluster.ca_crt())?);
    Ok(json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "system:aggregated-metrics-reader", "labels": {
                    "rbac.authorization.k8s.io/aggregate-to-admin": "true",
                    "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                    "rbac.authorization.k8s.io/aggregate-to-view": "true",
                }},
                "rules": [{"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "system:metrics-server"},
                "rules": [
                    {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                    {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "system:metrics-server"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:metrics-server"},
                "subjects": user,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "metrics-server:system:auth-delegator"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
                "subjects": user,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "metrics-server-auth-reader", "namespace": "kube-system"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "extension-apiserver-authentication-reader"},
                "subjects": user,
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "metrics-server", "namespace": "kube-system"},
                "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": addr.port()}]},
            },
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": "metrics-server", "namespace": "kube-system"},
                "subsets": [{
                    "addresses": [{"ip": addr.ip().to_string()}],
                    "ports": [{"name": "https", "port": addr.port(), "protocol": "TCP"}],
                }],
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": API_SERVICE},
                "spec": {
                    "service": {"name": "metrics-server", "namespace": "kube-system", "port": 443},
                    "group": "metrics.k8s.io",
                    "version": "v1beta1",
                    "caBundle": ca_bundle,
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                },
            },
        ],
    }))
}
