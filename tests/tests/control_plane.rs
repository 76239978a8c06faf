//! The local control plane (`tools/cluster`) is real Kubernetes: each component does its job.
//!
//! One cluster for the whole binary: a single test brings it up and checks, in order, that
//! - the API server answers `/readyz` with `ok` through kubectl and reports the pinned version;
//!   the kubectl is the one built from the same release (unless `$KUBECTL` names another);
//! - the controller-manager turns a Deployment into a ReplicaSet and the ReplicaSet into pods;
//! - the scheduler reports a pod whose nodeSelector matches no node as Unschedulable;
//! - a `kube-apiserver-client-kubelet` CSR made with the bootstrap token is auto-approved and
//!   signed by the cluster CA with the requested node identity (the node TLS bootstrap path).
//!
//! Dropping the cluster stops every process, also when an assertion fails.
//! Run: `cargo test -p wasinode-e2e --test control_plane -- --nocapture`

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::cluster::Cluster;
use e2e::registry::{base64, unbase64};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn control_plane_components_are_real() -> Result<()> {
    let cluster = Cluster::up()?;
    api_server_is_ready(&cluster).context("API server")?;
    controller_manager_reconciles_deployments(&cluster).context("controller-manager")?;
    scheduler_reports_unschedulable(&cluster).context("scheduler")?;
    bootstrap_token_gets_node_client_certificate(&cluster).context("CSR signing")?;
    cluster.down()
}

fn api_server_is_ready(cluster: &Cluster) -> Result<()> {
    let readyz = cluster.kubectl(&["get", "--raw", "/readyz"])?;
    ensure!(readyz.trim() == "ok", "/readyz answered {readyz:?}");
    let version = cluster.kubectl_json(&["version"])?;
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        server.starts_with("v1.3"),
        "server version {server:?}: {version}"
    );
    let client = version["clientVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    // Unless $KUBECTL names one, the kubectl is built with the control plane, from its release.
    ensure!(
        std::env::var_os("KUBECTL").is_some() || client == server,
        "kubectl {client:?} is not the control plane's release {server:?}"
    );
    eprintln!("API server {server}, kubectl {client}: /readyz ok");
    Ok(())
}

fn owner_kind_name(obj: &Value) -> (String, String) {
    let owner = &obj["metadata"]["ownerReferences"][0];
    (
        owner["kind"].as_str().unwrap_or_default().to_string(),
        owner["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn controller_manager_reconciles_deployments(cluster: &Cluster) -> Result<()> {
    cluster.kubectl(&[
        "create",
        "deployment",
        "cp-test",
        "-n",
        "default",
        "--replicas=2",
        "--image=registry.invalid/never-pulled:1",
    ])?;
    let mut rs_name = String::new();
    cluster.wait_for("the Deployment's ReplicaSet", TIMEOUT, || {
        let list =
            cluster.kubectl_json(&["get", "replicasets", "-n", "default", "-l", "app=cp-test"])?;
        let Some(rs) = list["items"].as_array().and_then(|items| items.first()) else {
            return Ok(false);
        };
        let (kind, owner) = owner_kind_name(rs);
        ensure!(
            kind == "Deployment" && owner == "cp-test",
            "ReplicaSet owned by {kind}/{owner}"
        );
        rs_name = rs["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok(true)
    })?;
    cluster.wait_for("the ReplicaSet's 2 pods", TIMEOUT, || {
        let list = cluster.kubectl_json(&["get", "pods", "-n", "default", "-l", "app=cp-test"])?;
        let pods = list["items"].as_array().cloned().unwrap_or_default();
        for pod in &pods {
            let (kind, owner) = owner_kind_name(pod);
            ensure!(
                kind == "ReplicaSet" && owner == rs_name,
                "pod owned by {kind}/{owner}"
            );
        }
        Ok(pods.len() == 2)
    })?;
    eprintln!("controller-manager: Deployment cp-test -> ReplicaSet {rs_name} -> 2 pods");
    cluster.kubectl(&[
        "delete",
        "deployment",
        "cp-test",
        "-n",
        "default",
        "--wait=false",
    ])?;
    Ok(())
}

fn scheduler_reports_unschedulable(cluster: &Cluster) -> Result<()> {
    // With no node at all the scheduler only says "no nodes available"; give it a node (an API
    // object only, no kubelet) so that it must evaluate the nodeSelector. The pod tolerates every
    // taint (the node-lifecycle controller taints a node that never reports Ready), so the
    // nodeSelector is the only reason left not to schedule it.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{
  "apiVersion": "v1", "kind": "Node",
  "metadata": {"name": "cp-fake-node", "labels": {"wasinode.test/role": "fake"}}
}"#,
    )?;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"{
  "apiVersion": "v1", "kind": "Pod",
  "metadata": {"name": "cp-unschedulable", "namespace": "default"},
  "spec": {
    "nodeSelector": {"wasinode.test/role": "no-such-node"},
    "tolerations": [{"operator": "Exists"}],
    "containers": [{"name": "c", "image": "registry.invalid/never-pulled:1"}]
  }
}"#,
    )?;
    let mut message = String::new();
    cluster.wait_for("PodScheduled=False/Unschedulable", TIMEOUT, || {
        let pod = cluster.kubectl_json(&["get", "pod", "cp-unschedulable", "-n", "default"])?;
        let conditions = pod["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(conditions.iter().any(|c| {
            let hit = c["type"] == "PodScheduled"
                && c["status"] == "False"
                && c["reason"] == "Unschedulable";
            if hit {
                message = c["message"].as_str().unwrap_or_default().to_string();
            }
            hit
        }))
    })?;
    ensure!(
        message.contains("0/1 nodes are available")
            && message.contains("didn't match Pod's node affinity/selector"),
        "unexpected scheduler message {message:?}"
    );
    // The scheduler, not anything else, said so: its FailedScheduling event.
    cluster.wait_for("the scheduler's FailedScheduling event", TIMEOUT, || {
        let events = cluster.kubectl_json(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=cp-unschedulable,reason=FailedScheduling",
        ])?;
        Ok(events["items"].as_array().is_some_and(|items| {
            items.iter().any(|e| {
                e["reportingComponent"] == "default-scheduler"
                    || e["source"]["component"] == "default-scheduler"
            })
        }))
    })?;
    eprintln!("scheduler: cp-unschedulable is Unschedulable: {message}");
    cluster.kubectl(&[
        "delete",
        "pod",
        "cp-unschedulable",
        "-n",
        "default",
        "--wait=false",
    ])?;
    cluster.kubectl(&["delete", "node", "cp-fake-node", "--wait=false"])?;
    Ok(())
}

fn openssl(args: &[&str]) -> Result<String> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn bootstrap_token_gets_node_client_certificate(cluster: &Cluster) -> Result<()> {
    let node = "cp-test-node";
    let bootstrap = cluster.bootstrap_kubeconfig();
    let as_bootstrap =
        |args: &[&str], stdin: Option<&str>| cluster.kubectl_with(&bootstrap, args, stdin);

    // The token is a bootstrap token: it authenticates as system:bootstrap:<id> in
    // system:bootstrappers, may create CSRs, and may do nothing else.
    let can = |verb: &str, resource: &str| -> Result<String> {
        // `auth can-i` exits 1 for "no"; the answer is on stdout either way.
        let out = Command::new(&cluster.kubectl_path)
            .arg("--kubeconfig")
            .arg(&bootstrap)
            .args(["auth", "can-i", verb, resource])
            .output()?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    ensure!(
        can("create", "certificatesigningrequests")? == "yes",
        "bootstrap token cannot create CSRs"
    );
    ensure!(
        can("list", "pods")? == "no",
        "bootstrap token can list pods"
    );

    let work = tempfile::tempdir()?;
    let key = work.path().join("node.key");
    let csr = work.path().join("node.csr");
    let crt = work.path().join("node.crt");
    let (key_s, csr_s, crt_s) = (
        key.to_str().unwrap(),
        csr.to_str().unwrap(),
        crt.to_str().unwrap(),
    );
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        key_s,
    ])?;
    let subject = format!("/O=system:nodes/CN=system:node:{node}");
    openssl(&[
        "req", "-new", "-key", key_s, "-subj", &subject, "-out", csr_s,
    ])?;
    let request = std::fs::read(&csr)?;
    let csr_name = format!("node-csr-{node}");
    let manifest = serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": csr_name},
        "spec": {
            "request": base64(&request),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "client auth"],
        },
    });
    as_bootstrap(&["create", "-f", "-"], Some(&manifest.to_string()))?;

    let mut certificate = String::new();
    let mut csr_obj = Value::Null;
    cluster.wait_for("the CSR to be approved and signed", TIMEOUT, || {
        let out = as_bootstrap(&["get", "csr", &csr_name, "-o", "json"], None)?;
        csr_obj = serde_json::from_str(&out)?;
        let approved = csr_obj["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Approved" && c["status"] == "True")
            });
        certificate = csr_obj["status"]["certificate"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok(approved && !certificate.is_empty())
    })?;
    let requester = csr_obj["spec"]["username"].as_str().unwrap_or_default();
    ensure!(
        requester.starts_with("system:bootstrap:"),
        "CSR requested by {requester:?}"
    );

    let pem = unbase64(&certificate)?;
    std::fs::write(&crt, pem)?;
    let ca = cluster.ca_crt();
    let verify = openssl(&["verify", "-CAfile", ca.to_str().unwrap(), crt_s])?;
    ensure!(verify.trim().ends_with(": OK"), "openssl verify: {verify}");
    let subject = openssl(&[
        "x509", "-in", crt_s, "-noout", "-subject", "-nameopt", "RFC2253",
    ])?;
    ensure!(
        subject.trim() == format!("subject=CN=system:node:{node},O=system:nodes"),
        "certificate subject {subject:?}"
    );
    let eku = openssl(&["x509", "-in", crt_s, "-noout", "-ext", "extendedKeyUsage"])?;
    ensure!(
        eku.contains("TLS Web Client Authentication"),
        "certificate usages {eku:?}"
    );
    // The certificate matches our key.
    let from_cert = openssl(&["x509", "-in", crt_s, "-noout", "-pubkey"])?;
    let from_key = openssl(&["pkey", "-in", key_s, "-pubout"])?;
    ensure!(
        from_cert == from_key,
        "signed certificate is for another key"
    );
    // And it authenticates as the node.
    let whoami = Command::new(&cluster.kubectl_path)
        .args([
            "--server",
            &cluster.api_server,
            "--certificate-authority",
            ca.to_str().unwrap(),
        ])
        .args([
            "--client-certificate",
            crt_s,
            "--client-key",
            key_s,
            "--kubeconfig",
            "/dev/null",
        ])
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()?;
    let user = String::from_utf8_lossy(&whoami.stdout);
    ensure!(
        whoami.status.success() && user == format!("system:node:{node}"),
        "whoami with the signed certificate: {user:?} {}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    eprintln!(
        "CSR {csr_name} by {requester}: approved, signed by ca.crt, {}, authenticates as {user}",
        subject.trim()
    );
    Ok(())
}
