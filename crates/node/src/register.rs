//! The Node object and its heartbeats: create or update the Node, keep its status true, and renew
//! its Lease in `kube-node-lease`.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::host::HostInfo;
use crate::{Config, time};

/// The `kubernetes.io/arch` label, taint key and `nodeInfo.architecture` of a wasinode node.
///
/// `nodeInfo.architecture` says `wasm32-wagi` rather than the host's `amd64`: the kubelet fills
/// both the label and that field from the platform its containers run on, and ours run on
/// wasm32 whatever the host CPU is. Keeping them equal means no tool sees two answers.
pub const ARCH: &str = "wasm32-wagi";
/// Semver within skew of a 1.33 control plane; the pre-release part names us.
pub const KUBELET_VERSION: &str = "v1.33.0-wasinode";
pub const MAX_PODS: u32 = 110;
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_DURATION_SECONDS: i32 = 40;
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
pub const STATUS_UPDATE: Duration = Duration::from_secs(60);

pub fn runtime_version() -> String {
    format!("wasinode://{} (wasmtime 48)", env!("CARGO_PKG_VERSION"))
}

/// Labels and spec of the Node object (what `create` sends and an update patches).
pub fn node_object(cfg: &Config) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": cfg.node_name,
            "labels": {
                "kubernetes.io/arch": ARCH,
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": cfg.node_name,
                "beta.kubernetes.io/arch": ARCH,
                "beta.kubernetes.io/os": "linux",
                "agentpool": cfg.pool,
            },
        },
        "spec": {
            "taints": [
                {"key": "kubernetes.io/arch", "value": ARCH, "effect": "NoSchedule"},
                {"key": "kubernetes.io/arch", "value": ARCH, "effect": "NoExecute"},
            ],
        },
    })
}

/// `status` of the Node as the kubelet would report it now.
pub fn node_status(cfg: &Config, host: &HostInfo, now: SystemTime, since: SystemTime) -> Value {
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": time(now), "lastTransitionTime": time(since),
        })
    };
    let resources = json!({
        "cpu": host.cpus.to_string(),
        "memory": format!("{}Ki", host.memory_kib),
        "pods": MAX_PODS.to_string(),
    });
    json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": cfg.node_ip.to_string()},
                {"type": "Hostname", "address": cfg.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
            "nodeInfo": {
                "machineID": host.machine_id,
                "systemUUID": host.system_uuid,
                "bootID": host.boot_id,
                "kernelVersion": host.kernel_version,
                "osImage": host.os_image,
                "containerRuntimeVersion": runtime_version(),
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": ARCH,
            },
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "wasinode has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "wasinode has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "wasinode has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "wasinode is posting ready status"),
            ],
        }
    })
}

/// Creates the Node, or updates the labels and taints of an existing one of the same name; then
/// writes its status. Returns the Node's uid.
pub async fn register(
    client: &kube::Client,
    cfg: &Config,
    host: &HostInfo,
) -> kube::Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let want = node_object(cfg);
    let node = match nodes.get_opt(&cfg.node_name).await? {
        Some(existing) => {
            // Merge patch: our labels win, other labels (set by admins) stay. NodeRestriction
            // forbids a node to change its own taints, so they are only sent when they differ
            // (then an admin identity is needed; as a node we keep what the admin set).
            let have = serde_json::to_value(
                existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default(),
            )
            .unwrap_or_default();
            let want_taints = want["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let has_ours = want_taints.iter().all(|t| {
                have.as_array().is_some_and(|h| {
                    h.iter().any(|x| {
                        x["key"] == t["key"]
                            && x["value"] == t["value"]
                            && x["effect"] == t["effect"]
                    })
                })
            });
            let labels = json!({"metadata": {"labels": want["metadata"]["labels"]}});
            let node = nodes
                .patch(
                    &cfg.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&labels),
                )
                .await?;
            if has_ours {
                node
            } else {
                let taints = json!({"spec": want["spec"]});
                match nodes
                    .patch(
                        &cfg.node_name,
                        &PatchParams::default(),
                        &Patch::Merge(&taints),
                    )
                    .await
                {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!("cannot set the taints of node {}: {e}", cfg.node_name);
                        node
                    }
                }
            }
        }
        None => {
            let obj: Node = serde_json::from_value(want).map_err(kube::Error::SerdeError)?;
            match nodes.create(&PostParams::default(), &obj).await {
                Ok(n) => n,
                Err(kube::Error::Api(e)) if e.code == 409 => nodes.get(&cfg.node_name).await?,
                Err(e) => return Err(e),
            }
        }
    };
    let now = SystemTime::now();
    patch_status(client, cfg, host, now, now).await?;
    Ok(node.metadata.uid.unwrap_or_default())
}

pub async fn patch_status(
    client: &kube::Client,
    cfg: &Config,
    host: &HostInfo,
    now: SystemTime,
    since: SystemTime,
) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = node_status(cfg, host, now, since);
    nodes
        .patch_status(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(())
}

fn lease_object(cfg: &Config, node_uid: &str, now: SystemTime) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": cfg.node_name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": cfg.node_name, "uid": node_uid,
            }],
        },
        "spec": {
            "holderIdentity": cfg.node_name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": micro_time(now),
        },
    })
}

fn micro_time(t: SystemTime) -> Value {
    let ts = k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        ts,
    ))
    .unwrap_or(Value::Null)
}

/// Creates the Lease or renews it.
pub async fn renew_lease(client: &kube::Client, cfg: &Config, node_uid: &str) -> kube::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = SystemTime::now();
    let want = lease_object(cfg, node_uid, now);
    let patch = json!({"metadata": {"ownerReferences": want["metadata"]["ownerReferences"]}, "spec": want["spec"]});
    match leases
        .patch(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let obj: Lease = serde_json::from_value(want).map_err(kube::Error::SerdeError)?;
            leases.create(&PostParams::default(), &obj).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Keeps the node alive: registers (retrying with backoff until the API server answers), then
/// renews the Lease every 10 s and rewrites the status every minute. Never returns.
pub async fn heartbeat(client: kube::Client, cfg: Config, host: HostInfo) {
    let mut delay = Duration::from_millis(500);
    let uid = loop {
        match register(&client, &cfg, &host).await {
            Ok(uid) => break uid,
            Err(e) => {
                tracing::warn!(
                    "registering node {}: {e}; retrying in {delay:?}",
                    cfg.node_name
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(node = %cfg.node_name, "node registered");
    let since = SystemTime::now();
    let mut last_status = std::time::Instant::now();
    loop {
        if let Err(e) = renew_lease(&client, &cfg, &uid).await {
            tracing::warn!("renewing lease: {e}");
        }
        if last_status.elapsed() >= STATUS_UPDATE {
            match patch_status(&client, &cfg, &host, SystemTime::now(), since).await {
                Ok(()) => last_status = std::time::Instant::now(),
                Err(e) => tracing::warn!("updating node status: {e}"),
            }
        }
        tokio::time::sleep(LEASE_RENEW).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            node_name: "n1".into(),
            node_ip: "10.0.0.5".parse().unwrap(),
            pool: "wasinode".into(),
            port: 10250,
            address: "0.0.0.0".parse().unwrap(),
            pod_address: None,
            shutdown_grace: Duration::from_secs(1),
            client_ca: vec![],
        }
    }

    #[test]
    fn node_object_has_labels_and_taints() {
        let n = node_object(&cfg());
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/arch"], "wasm32-wagi");
        assert_eq!(n["metadata"]["labels"]["agentpool"], "wasinode");
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        let effects: Vec<_> = n["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["effect"].as_str().unwrap())
            .collect();
        assert_eq!(effects, ["NoSchedule", "NoExecute"]);
        let _: Node = serde_json::from_value(n).unwrap();
    }

    #[test]
    fn status_parses_as_node_status() {
        let host = HostInfo::detect();
        let now = SystemTime::now();
        let s = node_status(&cfg(), &host, now, now);
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": s["status"]}))
                .unwrap();
        let st = node.status.unwrap();
        let info = st.node_info.unwrap();
        assert_eq!(info.kubelet_version, KUBELET_VERSION);
        assert!(info.container_runtime_version.starts_with("wasinode://"));
        assert_eq!(
            st.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port,
            10250
        );
        let ready = st
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(st.capacity.unwrap()["pods"].0, "110");
    }

    #[test]
    fn lease_parses() {
        let l: Lease =
            serde_json::from_value(lease_object(&cfg(), "uid-1", SystemTime::now())).unwrap();
        let spec = l.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert!(spec.renew_time.is_some());
        assert_eq!(l.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }
}
