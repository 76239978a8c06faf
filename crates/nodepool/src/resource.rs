//! The `NodePool` custom resource (`nodepools.wasinode.dev/v1alpha1`): what a pool is, as every
//! Kubernetes tool sees it, and the CustomResourceDefinition that installs it.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::core::{ApiResource, GroupVersionKind, Object};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Error, Op};

pub const GROUP: &str = "wasinode.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "NodePool";
pub const PLURAL: &str = "nodepools";
pub const CRD_NAME: &str = "nodepools.wasinode.dev";
/// Held by the pool until its provisioner has stopped every agent and deleted every Node.
pub const FINALIZER: &str = "wasinode.dev/local-provisioner";
/// The only workload runtime a wasinode pool has (AKS spells it `WasmWasi`).
pub const WASM_WASI: &str = "WasmWasi";
/// The node label naming a node's pool (as AKS and the seed's `agentpool=mywasipool`).
pub const POOL_LABEL: &str = "agentpool";

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub count: u32,
    pub workload_runtime: String,
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    /// `key=value:Effect`, as `--register-with-taints` and `az aks nodepool --node-taints` take them.
    #[serde(default)]
    pub node_taints: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default)]
    pub provisioning_state: String,
    #[serde(default)]
    pub ready_nodes: u32,
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// The host whose local provisioner runs the pool's agents.
    #[serde(default)]
    pub provisioner: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    pub ready: bool,
    #[serde(default)]
    pub restarts: u32,
}

pub type NodePool = Object<Spec, Status>;

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

pub fn api(client: &kube::Client) -> Api<NodePool> {
    Api::all_with(client.clone(), &api_resource())
}

/// The CustomResourceDefinition, cluster-scoped, with status and scale subresources (so
/// `kubectl scale nodepool P --replicas N` works too) and the columns `kubectl get nodepools` prints.
pub fn crd() -> Value {
    let string = json!({"type": "string"});
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "kind": KIND, "plural": PLURAL, "singular": "nodepool",
                "listKind": "NodePoolList", "shortNames": ["np"],
            },
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.count",
                        "statusReplicasPath": ".status.readyNodes",
                    },
                },
                "additionalPrinterColumns": [
                    {"name": "Count", "type": "integer", "jsonPath": ".spec.count"},
                    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyNodes"},
                    {"name": "Runtime", "type": "string", "jsonPath": ".spec.workloadRuntime"},
                    {"name": "State", "type": "string", "jsonPath": ".status.provisioningState"},
                    {"name": "Taints", "type": "string", "jsonPath": ".spec.nodeTaints"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A pool of wasinode nodes: Kubernetes nodes whose runtime is wasmtime.",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["count", "workloadRuntime"],
                            "properties": {
                                "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                                "workloadRuntime": {"type": "string", "enum": [WASM_WASI]},
                                "nodeLabels": {"type": "object", "additionalProperties": string},
                                "nodeTaints": {"type": "array", "items": string},
                            },
                        },
                        "status": {
                            "type": "object",
                            "properties": {
                                "provisioningState": string,
                                "readyNodes": {"type": "integer"},
                                "provisioner": string,
                                "message": string,
                                "nodes": {"type": "array", "items": {
                                    "type": "object",
                                    "properties": {
                                        "name": string, "address": string,
                                        "ready": {"type": "boolean"},
                                        "restarts": {"type": "integer"},
                                    },
                                }},
                            },
                        },
                    },
                }},
            }],
        },
    })
}

/// Installs the CRD when it is missing and waits until the API serves it.
pub async fn ensure_crd(client: &kube::Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let established = |c: &CustomResourceDefinition| {
        c.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    };
    match crds.get_opt(CRD_NAME).await {
        Ok(Some(c)) if established(&c) => return Ok(()),
        Ok(Some(_)) => {}
        Ok(None) => {
            let crd: CustomResourceDefinition =
                serde_json::from_value(crd()).map_err(|e| Error::Encode {
                    what: "the NodePool CRD",
                    source: e.into(),
                })?;
            match crds.create(&PostParams::default(), &crd).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    return Err(Error::CrdInstallForbidden);
                }
                Err(e) => return Err(Error::api(Op::InstallCrd)(e)),
            }
        }
        Err(kube::Error::Api(s)) if s.code == 403 => return Err(Error::CrdReadForbidden),
        Err(e) => return Err(Error::api(Op::ReadCrd)(e)),
    }
    for _ in 0..100 {
        if let Ok(Some(c)) = crds.get_opt(CRD_NAME).await
            && established(&c)
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(Error::CrdNotServed)
}

/// A pool's settings as the command line gives them, refused before anything reaches the
/// cluster.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "invalid node pool name {0:?}: use 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit (a DNS label; nodes are named {0}-000000, ...)"
    )]
    InvalidName(String),
    #[error("invalid taint {0:?}: expected key=value:Effect")]
    TaintWithoutEffect(String),
    #[error("invalid taint {0:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute")]
    UnknownTaintEffect(String),
    #[error("invalid taint {0:?}: the key is empty")]
    TaintWithoutKey(String),
    #[error("invalid label {0:?}: expected key=value")]
    LabelWithoutValue(String),
    #[error("invalid label {0:?}: the key is empty")]
    LabelWithoutKey(String),
    #[error("the {POOL_LABEL} label is the pool's name; it cannot be set with --labels")]
    ReservedLabel,
    #[error(
        "--workload-runtime OCIContainer: wasinode pools run WebAssembly only; container node pools belong to the cluster's own tooling (e.g. `az aks nodepool add` without --workload-runtime)"
    )]
    ContainerRuntime,
    #[error("unknown --workload-runtime {0:?}: the only runtime is {WASM_WASI}")]
    UnknownRuntime(String),
}

/// Whether `name` is a DNS-1123 label short enough that `<name>-000000` is one too.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 40 || !ok_chars || !ok_ends {
        return Err(SpecError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// `P-000000`, `P-000001`, ...: stable, unique names of a pool's nodes.
pub fn node_name(pool: &str, index: u32) -> String {
    format!("{pool}-{index:06}")
}

/// The index of a node of `pool` from its name.
pub fn node_index(pool: &str, node: &str) -> Option<u32> {
    let digits = node.strip_prefix(pool)?.strip_prefix('-')?;
    (digits.len() == 6).then(|| digits.parse().ok()).flatten()
}

/// `key=value:Effect` (or `key:Effect`) checked as the kubelet's `--register-with-taints` does.
pub fn validate_taint(t: &str) -> Result<(), SpecError> {
    let (kv, effect) = t
        .rsplit_once(':')
        .ok_or_else(|| SpecError::TaintWithoutEffect(t.to_string()))?;
    if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
        return Err(SpecError::UnknownTaintEffect(t.to_string()));
    }
    let key = kv.split_once('=').map_or(kv, |(k, _)| k);
    if key.is_empty() {
        return Err(SpecError::TaintWithoutKey(t.to_string()));
    }
    Ok(())
}

/// The seed's taints: `kubernetes.io/arch=wasm32-wagi` with NoSchedule and NoExecute.
pub fn default_taints() -> Vec<String> {
    ["NoSchedule", "NoExecute"]
        .iter()
        .map(|e| format!("kubernetes.io/arch={}:{e}", node::register::ARCH))
        .collect()
}

/// `key=value` items (empty ones skipped) as node labels; the pool label is the pool's own.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>, SpecError> {
    let mut labels = BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| SpecError::LabelWithoutValue(item.clone()))?;
        if k.is_empty() {
            return Err(SpecError::LabelWithoutKey(item.clone()));
        }
        if k == POOL_LABEL {
            return Err(SpecError::ReservedLabel);
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// The runtime's canonical spelling (`WasmWasi`, in any case); container pools are refused with
/// a pointer to the cluster's own tooling.
pub fn check_runtime(runtime: &str) -> Result<String, SpecError> {
    if runtime.eq_ignore_ascii_case(WASM_WASI) {
        return Ok(WASM_WASI.to_string());
    }
    if runtime.eq_ignore_ascii_case("OCIContainer") {
        return Err(SpecError::ContainerRuntime);
    }
    Err(SpecError::UnknownRuntime(runtime.to_string()))
}

impl Spec {
    /// A pool's spec from the values `nodepool add` takes, checked in the order the user gave
    /// them: runtime, labels, taints (`None`: [`default_taints`]; empty items skipped).
    pub fn new(
        count: u32,
        workload_runtime: &str,
        labels: &[String],
        taints: Option<&[String]>,
    ) -> Result<Spec, SpecError> {
        let workload_runtime = check_runtime(workload_runtime)?;
        let node_labels = parse_labels(labels)?;
        let node_taints: Vec<String> = match taints {
            None => default_taints(),
            Some(t) => t.iter().filter(|t| !t.is_empty()).cloned().collect(),
        };
        for t in &node_taints {
            validate_taint(t)?;
        }
        Ok(Spec {
            count,
            workload_runtime,
            node_labels,
            node_taints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("mywasipool").is_ok());
        assert!(validate_name("a-1").is_ok());
        for bad in ["", "My", "-a", "a-", "a_b", "a.b", &"x".repeat(41)] {
            let e = validate_name(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("invalid node pool name"), "{bad}: {e}");
        }
        assert_eq!(node_name("p", 7), "p-000007");
        assert_eq!(node_index("p", "p-000007"), Some(7));
        assert_eq!(node_index("p", "px-000007"), None);
        assert_eq!(node_index("p", "p-7"), None);
    }

    #[test]
    fn taints() {
        for t in default_taints() {
            assert_eq!(validate_taint(&t), Ok(()));
        }
        assert!(validate_taint("k:NoSchedule").is_ok());
        assert!(validate_taint("k=v").is_err());
        assert!(validate_taint("k=v:Sometimes").is_err());
        assert!(validate_taint("=v:NoSchedule").is_err());
    }

    #[test]
    fn container_pools_are_refused_with_a_pointer() {
        assert_eq!(check_runtime("wasmwasi").ok().as_deref(), Some(WASM_WASI));
        let e = check_runtime("OCIContainer")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cluster's own tooling"), "{e}");
        assert!(check_runtime("Docker").is_err());
    }

    #[test]
    fn labels_parse_and_the_pool_label_is_reserved() {
        let l = parse_labels(&["a=b".into(), "c=".into()]).unwrap_or_default();
        assert_eq!(l.get("a").map(String::as_str), Some("b"));
        assert_eq!(l.get("c").map(String::as_str), Some(""));
        assert!(parse_labels(&["novalue".into()]).is_err());
        assert!(parse_labels(&["agentpool=x".into()]).is_err());
    }

    /// A pool as the provisioner writes it: every field set.
    fn full_pool() -> NodePool {
        let mut np = NodePool::new(
            "mywasipool",
            &api_resource(),
            Spec {
                count: 3,
                workload_runtime: WASM_WASI.into(),
                node_labels: BTreeMap::from([("team".into(), "a".into())]),
                node_taints: default_taints(),
            },
        );
        np.status = Some(Status {
            provisioning_state: "Succeeded".into(),
            ready_nodes: 2,
            nodes: vec![NodeStatus {
                name: node_name("mywasipool", 0),
                address: "127.100.0.1".into(),
                ready: true,
                restarts: 1,
            }],
            provisioner: "host".into(),
            message: "draining mywasipool-000002: blocked".into(),
        });
        np
    }

    /// The value at a printer column's `.a.b` path, as kubectl prints a cell.
    fn cell(v: &Value, path: &str) -> String {
        let mut at = v;
        for key in path.trim_start_matches('.').split('.') {
            at = &at[key];
        }
        match at {
            Value::Null => "<none>".into(),
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        }
    }

    #[test]
    fn kubectl_get_nodepools_shows_count_ready_runtime_state_and_taints() {
        let crd: CustomResourceDefinition =
            serde_json::from_value(crd()).unwrap_or_else(|e| panic!("the CRD: {e}"));
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["np".to_string()]));
        let version = &crd.spec.versions[0];
        let columns = version
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["Count", "Ready", "Runtime", "State", "Taints", "Age"]
        );
        let pool = serde_json::to_value(full_pool()).unwrap_or_default();
        let row: Vec<String> = columns[..5]
            .iter()
            .map(|c| cell(&pool, &c.json_path))
            .collect();
        assert_eq!(
            row,
            [
                "3",
                "2",
                "WasmWasi",
                "Succeeded",
                "kubernetes.io/arch=wasm32-wagi:NoSchedule,kubernetes.io/arch=wasm32-wagi:NoExecute"
            ]
        );
        assert_eq!(columns[5].json_path, ".metadata.creationTimestamp");
        // `kubectl scale nodepool P --replicas N` sets the count and reads the ready nodes.
        let scale = version
            .subresources
            .as_ref()
            .and_then(|s| s.scale.clone())
            .unwrap_or_else(|| panic!("no scale subresource"));
        assert_eq!(cell(&pool, &scale.spec_replicas_path), "3");
        assert_eq!(
            scale.status_replicas_path.as_str(),
            columns[1].json_path.as_str()
        );
    }

    /// Fails with the first field of `value` that `schema` does not declare.
    fn declared(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        match value {
            Value::Object(fields) => {
                for (k, v) in fields {
                    let sub = match (&schema["properties"][k], &schema["additionalProperties"]) {
                        (Value::Null, Value::Null) => return Err(format!("{at}.{k}")),
                        (Value::Null, extra) => extra,
                        (declared, _) => declared,
                    };
                    declared(sub, v, &format!("{at}.{k}"))?;
                }
                Ok(())
            }
            Value::Array(items) => items
                .iter()
                .try_for_each(|i| declared(&schema["items"], i, &format!("{at}[]"))),
            _ => Ok(()),
        }
    }

    #[test]
    fn the_api_server_keeps_every_field_the_pool_is_written_with() {
        // A structural schema prunes undeclared fields: a field missing here would vanish from
        // `kubectl get nodepool -o yaml` and from what `nodepool show` reads back.
        let crd = crd();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let pool = serde_json::to_value(full_pool()).unwrap_or_default();
        for part in ["spec", "status"] {
            assert_eq!(
                declared(&schema["properties"][part], &pool[part], part),
                Ok(()),
                "{pool:#}"
            );
        }
        // What `nodepool add` creates passes the schema's own checks.
        let spec = &schema["properties"]["spec"];
        for required in spec["required"].as_array().into_iter().flatten() {
            let field = required.as_str().unwrap_or_default();
            assert!(!pool["spec"][field].is_null(), "{field} is required");
        }
        assert_eq!(
            spec["properties"]["workloadRuntime"]["enum"],
            json!([WASM_WASI])
        );
        assert!(spec["properties"]["count"]["maximum"].as_u64() >= Some(250));
    }

    #[test]
    fn the_longest_name_still_gives_node_names_kubernetes_accepts() {
        let longest = "a".repeat(40);
        assert_eq!(validate_name(&longest), Ok(()));
        // Node names are DNS labels too (at most 63 characters) for every index a pool can have.
        let node = node_name(&longest, 999_999);
        assert!(node.len() <= 63, "{node}");
        assert_eq!(node_index(&longest, &node), Some(999_999));
        let e = validate_name(&"a".repeat(41)).map_err(|e| e.to_string());
        assert!(
            e.as_ref().is_err_and(|e| e.contains("1-40 lowercase")),
            "{e:?}"
        );
    }

    #[test]
    fn add_settings_are_checked_before_anything_is_created() {
        // No --taints: the seed's two; `--taints ""`: none.
        let s = Spec::new(2, "wasmwasi", &[], None);
        assert_eq!(
            s.as_ref()
                .map(|s| (s.count, s.workload_runtime.as_str(), s.node_taints.len())),
            Ok((2, WASM_WASI, 2))
        );
        let none = Spec::new(1, WASM_WASI, &[], Some(&["".to_string()]));
        assert_eq!(none.map(|s| s.node_taints), Ok(vec![]));
        // The first bad value is the one reported.
        assert_eq!(
            Spec::new(1, "OCIContainer", &["agentpool=x".into()], None),
            Err(SpecError::ContainerRuntime)
        );
        assert_eq!(
            Spec::new(1, WASM_WASI, &["agentpool=x".into()], Some(&["k=v".into()])),
            Err(SpecError::ReservedLabel)
        );
        let e = Spec::new(1, WASM_WASI, &[], Some(&["k=v:Sometimes".into()]))
            .map_err(|e| e.to_string());
        assert_eq!(
            e,
            Err("invalid taint \"k=v:Sometimes\": the effect must be NoSchedule, PreferNoSchedule or NoExecute".to_string())
        );
    }

    #[test]
    fn the_crd_parses_as_a_crd() {
        let crd: Result<CustomResourceDefinition, _> = serde_json::from_value(crd());
        assert!(crd.is_ok(), "{crd:?}");
    }
}
