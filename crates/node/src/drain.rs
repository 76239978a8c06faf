//! Cordon and drain a node, as `kubectl drain` does: mark it unschedulable, evict its pods
//! through the Eviction API (so PodDisruptionBudgets are honoured) and wait until they are gone.
//!
//! Used by `wasinode node --drain-on-shutdown` (acting as the node itself: the Node authorizer
//! lets `system:node:N` patch its own Node and create `pods/eviction` for the pods bound to it)
//! and by the node-pool code (acting as an admin).
//!
//! kube's default client retries a 429 itself (up to 15 times, honouring `Retry-After`, which is
//! 10 s for an eviction a PodDisruptionBudget refuses), so a refused eviction would look like a
//! hung request. Give [`drain`] a client without that layer ([`crate::client_without_retries`])
//! to see each refusal at once; with any other client an eviction attempt that takes longer
//! than [`ATTEMPT`] is cancelled and counted as refused.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::time::Instant;

/// Longest time one eviction request may take before it is counted as refused (see the module
/// documentation).
pub const ATTEMPT: Duration = Duration::from_secs(15);

/// The annotation the kubelet puts on mirror pods (static pods' API shadows).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// How long [`drain`] waits, and how often it looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOptions {
    /// Longest time for the whole drain: evictions blocked by a PodDisruptionBudget and pods
    /// still terminating after it make the drain fail.
    pub timeout: Duration,
    /// Interval between retries of a blocked eviction and checks for terminated pods.
    pub poll: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5 * 60),
            poll: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(
        "cannot cordon node {node}: {source} (the identity needs `patch` on nodes; a node may \
         only patch its own Node object)"
    )]
    Cordon {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cannot list the pods of node {node}: {source} (the identity needs `list` on pods in \
         every namespace)"
    )]
    List {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cannot evict pod {pod}: a PodDisruptionBudget still forbids it after {}s \
         ({message}); scale up the pod's workload or relax its PodDisruptionBudget \
         (`kubectl get pdb -n {namespace}`), then drain again",
        waited.as_secs()
    )]
    Blocked {
        /// The pods still refused (`namespace/name`, comma-separated).
        pod: String,
        namespace: String,
        waited: Duration,
        message: String,
    },
    #[error(
        "cannot evict pod {pod}: {source} (the identity needs `create` on pods/eviction; a node \
         may only evict pods bound to it)"
    )]
    Evict {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "pods still terminating after {}s: {pods}; look at them with `kubectl describe \
         pod`, or delete them with --force once their workload is safe",
        waited.as_secs()
    )]
    Timeout { waited: Duration, pods: String },
}

/// Marks `node` unschedulable (`spec.unschedulable: true`, a merge patch): the scheduler places
/// no new pod there. Pods already on it keep running.
pub async fn cordon(client: &kube::Client, node: &str) -> Result<(), DrainError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .map(|_| ())
        .map_err(|source| DrainError::Cordon {
            node: node.to_string(),
            source,
        })
}

/// Why a pod bound to the node is left alone by a drain, if it is.
pub fn skip_reason(pod: &Pod) -> Option<&'static str> {
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    {
        return Some("a mirror pod");
    }
    if pod
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == "DaemonSet")
    {
        return Some("managed by a DaemonSet");
    }
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        // Finished: nothing runs, and evicting it would only be refused or pointless.
        return Some("finished");
    }
    None
}

/// The message of a refused eviction with its causes ("The disruption budget web needs 1
/// healthy pods and has 1 currently").
fn refusal_message(s: &kube::core::Status) -> String {
    let mut out = s.message.trim_end_matches('.').to_string();
    for cause in s.details.iter().flat_map(|d| &d.causes) {
        if !cause.message.is_empty() {
            out.push_str(": ");
            out.push_str(&cause.message);
        }
    }
    out
}

/// `namespace/name` of a pod.
fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The pods of `node` that a drain evicts.
async fn evictable(client: &kube::Client, node: &str) -> Result<Vec<Pod>, DrainError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(|source| DrainError::List {
            node: node.to_string(),
            source,
        })?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| skip_reason(p).is_none())
        .collect())
}

/// Cordons `node`, evicts each of its pods (except mirror pods, DaemonSet pods and finished
/// ones) through the Eviction API, and waits until the evicted pods are gone from the API.
/// Evictions a PodDisruptionBudget refuses are retried every `opts.poll` until `opts.timeout`
/// (the others go ahead meanwhile); then [`DrainError::Blocked`] names the pods still refused. `progress` receives one human line per step. Returns how many pods were
/// evicted.
pub async fn drain(
    client: &kube::Client,
    node: &str,
    opts: &DrainOptions,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<usize, DrainError> {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    cordon(client, node).await?;
    progress(&format!("node {node} cordoned"));
    // (name, namespace, uid, namespace/name) of the pods still to evict.
    let mut pending: Vec<(String, String, String, String)> = evictable(client, node)
        .await?
        .iter()
        .map(|pod| {
            (
                pod.metadata.name.clone().unwrap_or_default(),
                pod.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                pod.metadata.uid.clone().unwrap_or_default(),
                key(pod),
            )
        })
        .collect();
    // (uid, namespace/name) of every pod whose eviction was accepted.
    let mut evicted: Vec<(String, String)> = Vec::new();
    // In rounds, as `kubectl drain`: a pod whose budget refuses does not hold up the others.
    let mut round = 0;
    loop {
        let mut refused: Vec<(String, String, String, String, String)> = Vec::new();
        for (name, namespace, uid, pod_key) in std::mem::take(&mut pending) {
            if round == 0 {
                progress(&format!("evicting {pod_key}"));
            }
            let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            let attempt = ATTEMPT
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(100));
            match tokio::time::timeout(attempt, api.evict(&name, &EvictParams::default())).await {
                Ok(Ok(_)) => evicted.push((uid, pod_key)),
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                    progress(&format!("{pod_key} is already gone"));
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 429 => {
                    let why = refusal_message(&s);
                    refused.push((name, namespace, uid, pod_key, why));
                }
                Ok(Err(source)) => {
                    return Err(DrainError::Evict {
                        pod: pod_key,
                        source,
                    });
                }
                Err(_) => {
                    let why = format!(
                        "not accepted within {attempt:?}; the client retries refusals itself, \
                         most likely a PodDisruptionBudget forbids it"
                    );
                    refused.push((name, namespace, uid, pod_key, why));
                }
            }
        }
        let Some(first) = refused.first() else {
            break;
        };
        if Instant::now() + opts.poll >= deadline {
            return Err(DrainError::Blocked {
                pod: refused
                    .iter()
                    .map(|r| r.3.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                namespace: first.1.clone(),
                waited: start.elapsed(),
                message: first.4.clone(),
            });
        }
        for (_, _, _, pod_key, why) in &refused {
            progress(&format!(
                "{pod_key}: eviction refused ({why}); retrying in {:?}",
                opts.poll
            ));
        }
        pending = refused
            .into_iter()
            .map(|(name, namespace, uid, pod_key, _)| (name, namespace, uid, pod_key))
            .collect();
        round += 1;
        tokio::time::sleep(opts.poll).await;
    }
    let count = evicted.len();
    loop {
        let pods: Api<Pod> = Api::all(client.clone());
        let present: HashSet<String> = match pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
        {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|p| p.metadata.uid)
                .collect(),
            Err(source) => {
                return Err(DrainError::List {
                    node: node.to_string(),
                    source,
                });
            }
        };
        evicted.retain(|(uid, _)| present.contains(uid));
        if evicted.is_empty() {
            progress(&format!("node {node} drained ({count} pods evicted)"));
            return Ok(count);
        }
        if Instant::now() >= deadline {
            return Err(DrainError::Timeout {
                waited: start.elapsed(),
                pods: evicted
                    .iter()
                    .map(|(_, k)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        progress(&format!(
            "waiting for {} pod{} to terminate",
            evicted.len(),
            if evicted.len() == 1 { "" } else { "s" }
        ));
        tokio::time::sleep(
            opts.poll
                .min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn evicts_ordinary_and_replicaset_pods() {
        let plain = pod(json!({"metadata": {"name": "a", "namespace": "default"}}));
        assert_eq!(skip_reason(&plain), None);
        let rs = pod(json!({"metadata": {"name": "b", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u",
            "controller": true}]}, "status": {"phase": "Running"}}));
        assert_eq!(skip_reason(&rs), None);
    }

    #[test]
    fn skips_mirror_daemonset_and_finished_pods() {
        let mirror = pod(json!({"metadata": {"name": "m",
            "annotations": {"kubernetes.io/config.mirror": "abc"}}}));
        assert_eq!(skip_reason(&mirror), Some("a mirror pod"));
        let ds = pod(json!({"metadata": {"name": "d", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "u",
            "controller": true}]}}));
        assert_eq!(skip_reason(&ds), Some("managed by a DaemonSet"));
        let done = pod(json!({"metadata": {"name": "j"}, "status": {"phase": "Succeeded"}}));
        assert_eq!(skip_reason(&done), Some("finished"));
    }

    #[test]
    fn a_daemonset_that_is_not_the_controller_does_not_count() {
        let p = pod(json!({"metadata": {"name": "x", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "u"}]}}));
        assert_eq!(skip_reason(&p), None);
    }

    #[test]
    fn refusal_names_the_budget() {
        let s: kube::core::Status = serde_json::from_value(json!({
            "code": 429, "reason": "TooManyRequests",
            "message": "Cannot evict pod as it would violate the pod's disruption budget.",
            "details": {"causes": [{"reason": "DisruptionBudget",
                "message": "The disruption budget web needs 1 healthy pods and has 1 currently"}]}
        }))
        .expect("status");
        assert_eq!(
            refusal_message(&s),
            "Cannot evict pod as it would violate the pod's disruption budget: The disruption \
             budget web needs 1 healthy pods and has 1 currently"
        );
    }

    #[test]
    fn default_options_match_kubectl_like_values() {
        let o = DrainOptions::default();
        assert_eq!(o.timeout, Duration::from_secs(300));
        assert_eq!(o.poll, Duration::from_secs(2));
    }
}
