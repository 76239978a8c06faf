//! What the planner must not fetch itself: the node resolves a pod's references against the API
//! server before `Supervisor::start`. Env `valueFrom` (configMapKeyRef, secretKeyRef, fieldRef)
//! and `envFrom` become literal values; configMap and secret volumes are written to
//! `<volume_dir>/<uid>/<volume>` (where the planner maps them); `imagePullSecrets` become
//! registry credentials.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Pod, Secret};
use kube::api::Api;

use crate::volume::{VolumeFile, write_atomic};

/// Why a pod's references could not be resolved (kubelet reason `CreateContainerConfigError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Key -> bytes of a ConfigMap (data and binaryData) or Secret.
pub type Data = BTreeMap<String, Vec<u8>>;

/// Where ConfigMaps and Secrets come from (the API server; a map in tests).
pub trait Objects {
    /// `Ok(None)` when the object does not exist.
    fn config_map(
        &mut self,
        ns: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Result<Option<Data>, ConfigError>> + Send;
    fn secret(
        &mut self,
        ns: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Result<Option<(String, Data)>, ConfigError>> + Send;
}

/// The API server as [`Objects`], caching each object for one resolution.
pub struct ApiObjects {
    client: kube::Client,
    config_maps: HashMap<(String, String), Option<Data>>,
    secrets: HashMap<(String, String), Option<(String, Data)>>,
}

impl ApiObjects {
    pub fn new(client: kube::Client) -> ApiObjects {
        ApiObjects {
            client,
            config_maps: HashMap::new(),
            secrets: HashMap::new(),
        }
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Objects for ApiObjects {
    async fn config_map(&mut self, ns: &str, name: &str) -> Result<Option<Data>, ConfigError> {
        let k = (ns.to_string(), name.to_string());
        if let Some(v) = self.config_maps.get(&k) {
            return Ok(v.clone());
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let v = match api.get(name).await {
            Ok(cm) => {
                let mut d: Data = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                d.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                Some(d)
            }
            Err(e) if not_found(&e) => None,
            Err(e) => {
                return Err(ConfigError(format!(
                    "cannot get configmap {ns}/{name}: {e}"
                )));
            }
        };
        self.config_maps.insert(k, v.clone());
        Ok(v)
    }

    async fn secret(
        &mut self,
        ns: &str,
        name: &str,
    ) -> Result<Option<(String, Data)>, ConfigError> {
        let k = (ns.to_string(), name.to_string());
        if let Some(v) = self.secrets.get(&k) {
            return Ok(v.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let v = match api.get(name).await {
            Ok(s) => {
                let mut d: Data = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                d.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                Some((s.type_.unwrap_or_default(), d))
            }
            Err(e) if not_found(&e) => None,
            Err(e) => return Err(ConfigError(format!("cannot get secret {ns}/{name}: {e}"))),
        };
        self.secrets.insert(k, v.clone());
        Ok(v)
    }
}

/// A pod ready to plan, the credentials of its `imagePullSecrets`, and warnings (a missing pull
/// secret is a warning, as in the kubelet).
#[derive(Debug)]
pub struct Resolved {
    pub pod: Pod,
    pub creds: Option<oci::Credentials>,
    pub warnings: Vec<String>,
}

fn field_value(pod: &Pod, path: &str, node_ip: IpAddr) -> Result<String, ConfigError> {
    let m = &pod.metadata;
    let in_map = |map: &Option<BTreeMap<String, String>>, rest: &str| {
        let key = rest
            .strip_prefix("['")
            .and_then(|r| r.strip_suffix("']"))
            .or_else(|| rest.strip_prefix("[\"").and_then(|r| r.strip_suffix("\"]")));
        key.map(|k| {
            map.as_ref()
                .and_then(|m| m.get(k))
                .cloned()
                .unwrap_or_default()
        })
    };
    let v = match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => node_ip.to_string(),
        // The pod's own address where the node gave it one (the caller puts it in the pod's
        // status before resolving), else the node's.
        "status.podIP" | "status.podIPs" => pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_else(|| node_ip.to_string()),
        p => {
            if let Some(v) = p
                .strip_prefix("metadata.labels")
                .and_then(|r| in_map(&m.labels, r))
            {
                v
            } else if let Some(v) = p
                .strip_prefix("metadata.annotations")
                .and_then(|r| in_map(&m.annotations, r))
            {
                v
            } else {
                return Err(ConfigError(format!("fieldRef {p:?} is not supported")));
            }
        }
    };
    Ok(v)
}

fn text(bytes: &[u8], what: &str) -> Result<String, ConfigError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ConfigError(format!("{what} is not UTF-8 text")))
}

/// Resolves `pod` (see the module doc). ConfigMap volumes are written under
/// `volume_dir/<uid>/`, secret volumes under `secret_dir/<uid>/` ([`crate::volume`]).
pub async fn resolve(
    pod: &Pod,
    objects: &mut impl Objects,
    node_ip: IpAddr,
    volume_dir: &Path,
    secret_dir: &Path,
) -> Result<Resolved, ConfigError> {
    let mut out = pod.clone();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let Some(spec) = out.spec.as_mut() else {
        return Ok(Resolved {
            pod: out,
            creds: None,
            warnings,
        });
    };

    for c in spec.containers.iter_mut() {
        let mut env: Vec<EnvVar> = Vec::new();
        for from in c.env_from.take().unwrap_or_default() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let (what, data) = if let Some(r) = &from.config_map_ref {
                let d = objects.config_map(&ns, &r.name).await?;
                if d.is_none() && r.optional != Some(true) {
                    return Err(ConfigError(format!("configmap {:?} not found", r.name)));
                }
                (format!("configmap {:?}", r.name), d.unwrap_or_default())
            } else if let Some(r) = &from.secret_ref {
                let d = objects.secret(&ns, &r.name).await?;
                if d.is_none() && r.optional != Some(true) {
                    return Err(ConfigError(format!("secret {:?} not found", r.name)));
                }
                (
                    format!("secret {:?}", r.name),
                    d.map(|(_, d)| d).unwrap_or_default(),
                )
            } else {
                continue;
            };
            for (k, v) in data {
                env.push(EnvVar {
                    name: format!("{prefix}{k}"),
                    value: Some(text(&v, &format!("key {k:?} of {what}"))?),
                    value_from: None,
                });
            }
        }
        for e in c.env.take().unwrap_or_default() {
            let Some(src) = &e.value_from else {
                env.push(e);
                continue;
            };
            let value = if let Some(f) = &src.field_ref {
                Some(field_value(pod, &f.field_path, node_ip)?)
            } else if let Some(r) = &src.config_map_key_ref {
                let d = objects.config_map(&ns, &r.name).await?;
                match d.as_ref().map(|d| d.get(&r.key)) {
                    Some(Some(v)) => Some(text(
                        v,
                        &format!("key {:?} of configmap {:?}", r.key, r.name),
                    )?),
                    _ if r.optional == Some(true) => None,
                    None => return Err(ConfigError(format!("configmap {:?} not found", r.name))),
                    Some(None) => {
                        return Err(ConfigError(format!(
                            "couldn't find key {} in ConfigMap {ns}/{}",
                            r.key, r.name
                        )));
                    }
                }
            } else if let Some(r) = &src.secret_key_ref {
                let d = objects.secret(&ns, &r.name).await?;
                match d.as_ref().map(|(_, d)| d.get(&r.key)) {
                    Some(Some(v)) => {
                        Some(text(v, &format!("key {:?} of secret {:?}", r.key, r.name))?)
                    }
                    _ if r.optional == Some(true) => None,
                    None => return Err(ConfigError(format!("secret {:?} not found", r.name))),
                    Some(None) => {
                        return Err(ConfigError(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        )));
                    }
                }
            } else {
                return Err(ConfigError(format!(
                    "env {:?}: only fieldRef, configMapKeyRef and secretKeyRef are supported",
                    e.name
                )));
            };
            if let Some(value) = value {
                env.push(EnvVar {
                    name: e.name.clone(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
        // Later entries win, as in the kubelet (env over envFrom).
        let mut seen = HashMap::new();
        for (i, e) in env.iter().enumerate() {
            seen.insert(e.name.clone(), i);
        }
        let env: Vec<EnvVar> = env
            .into_iter()
            .enumerate()
            .filter(|(i, e)| seen.get(&e.name) == Some(i))
            .map(|(_, e)| e)
            .collect();
        c.env = if env.is_empty() { None } else { Some(env) };
    }

    for vol in spec.volumes.iter().flatten() {
        let (what, items, data, default_mode, root) = if let Some(cm) = &vol.config_map {
            let d = objects.config_map(&ns, &cm.name).await?;
            if d.is_none() && cm.optional != Some(true) {
                return Err(ConfigError(format!(
                    "volume {:?}: configmap {:?} not found",
                    vol.name, cm.name
                )));
            }
            (
                format!("configmap {:?}", cm.name),
                cm.items.clone(),
                d.unwrap_or_default(),
                cm.default_mode.map_or(0o644, |m| m as u32),
                volume_dir,
            )
        } else if let Some(s) = &vol.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let d = objects.secret(&ns, &name).await?;
            if d.is_none() && s.optional != Some(true) {
                return Err(ConfigError(format!(
                    "volume {:?}: secret {name:?} not found",
                    vol.name
                )));
            }
            (
                format!("secret {name:?}"),
                s.items.clone(),
                d.map(|(_, d)| d).unwrap_or_default(),
                // Owner bits only: the API defaults defaultMode to 0644, but guests read their
                // secrets through the agent, so no other host user needs them.
                s.default_mode.map_or(0o600, |m| m as u32 & 0o700),
                secret_dir,
            )
        } else {
            continue;
        };
        let files: Vec<VolumeFile> = match items {
            Some(items) => {
                let mut files = Vec::new();
                for it in items {
                    match data.get(&it.key) {
                        Some(v) => files.push(VolumeFile {
                            path: it.path.clone(),
                            bytes: v.clone(),
                            mode: it.mode.map_or(default_mode, |m| {
                                if vol.secret.is_some() {
                                    m as u32 & 0o700
                                } else {
                                    m as u32
                                }
                            }),
                        }),
                        None => {
                            return Err(ConfigError(format!(
                                "volume {:?}: no key {:?} in {what}",
                                vol.name, it.key
                            )));
                        }
                    }
                }
                files
            }
            None => data
                .into_iter()
                .map(|(path, bytes)| VolumeFile {
                    path,
                    bytes,
                    mode: default_mode,
                })
                .collect(),
        };
        let dir = root.join(&uid).join(&vol.name);
        let name = vol.name.clone();
        tokio::task::spawn_blocking(move || write_atomic(&dir, &files))
            .await
            .map_err(|e| ConfigError(format!("volume {name:?}: writer task failed: {e}")))?
            .map_err(|e| ConfigError(format!("volume {:?}: {e}", vol.name)))?;
    }

    let mut creds: Option<oci::Credentials> = None;
    for r in spec.image_pull_secrets.iter().flatten() {
        match objects.secret(&ns, &r.name).await? {
            Some((_, data)) => {
                let Some(bytes) = data.get(".dockerconfigjson").or_else(|| data.get(".dockercfg"))
                else {
                    warnings.push(format!(
                        "imagePullSecret {:?} has no .dockerconfigjson",
                        r.name
                    ));
                    continue;
                };
                match oci::Credentials::from_dockerconfigjson(bytes) {
                    Ok(c) => {
                        creds = Some(match creds {
                            Some(prev) => prev.merged(&c),
                            None => c,
                        })
                    }
                    Err(e) => warnings.push(format!("imagePullSecret {:?}: {e}", r.name)),
                }
            }
            None => warnings.push(format!(
                "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed.",
                r.name
            )),
        }
    }
    Ok(Resolved {
        pod: out,
        creds,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Default)]
    struct Fake {
        cms: HashMap<String, Data>,
        secrets: HashMap<String, (String, Data)>,
    }

    impl Objects for Fake {
        async fn config_map(&mut self, _ns: &str, name: &str) -> Result<Option<Data>, ConfigError> {
            Ok(self.cms.get(name).cloned())
        }
        async fn secret(
            &mut self,
            _ns: &str,
            name: &str,
        ) -> Result<Option<(String, Data)>, ConfigError> {
            Ok(self.secrets.get(name).cloned())
        }
    }

    fn data(pairs: &[(&str, &str)]) -> Data {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn fake() -> Fake {
        let mut f = Fake::default();
        f.cms.insert(
            "cfg".into(),
            data(&[("GREETING", "hi"), ("file.txt", "contents")]),
        );
        f.secrets.insert(
            "sec".into(),
            ("Opaque".into(), data(&[("PASSWORD", "s3cret")])),
        );
        f.secrets.insert(
            "pull".into(),
            (
                "kubernetes.io/dockerconfigjson".into(),
                data(&[(
                    ".dockerconfigjson",
                    r#"{"auths":{"reg.example:5000":{"username":"u","password":"p"}}}"#,
                )]),
            ),
        );
        f
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "web"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn env_of(p: &Pod) -> Vec<(String, String)> {
        p.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                assert!(e.value_from.is_none());
                (e.name, e.value.unwrap_or_default())
            })
            .collect()
    }

    #[tokio::test]
    async fn pod_ip_field_refs_name_the_pods_own_address_and_host_ip_the_nodes() {
        let tmp = std::env::temp_dir().join(format!("wasinode-resolve-ip-{}", std::process::id()));
        let mut p = pod(json!({"containers": [{"name": "c", "image": "x", "env": [
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        ]}]}));
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.214.0.9".into()),
            ..Default::default()
        });
        let r = resolve(&p, &mut fake(), "10.1.2.3".parse().unwrap(), &tmp, &tmp)
            .await
            .unwrap();
        let env = env_of(&r.pod);
        assert!(env.contains(&("IP".into(), "10.214.0.9".into())), "{env:?}");
        assert!(env.contains(&("HOST".into(), "10.1.2.3".into())), "{env:?}");
    }

    #[tokio::test]
    async fn env_sources_become_values() {
        let tmp = std::env::temp_dir().join(format!("wasinode-resolve-{}", std::process::id()));
        let p = pod(json!({"containers": [{"name": "c", "image": "x",
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "LIT", "value": "1"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "GREETING"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": true}}},
                {"name": "CFG_GREETING", "value": "override"},
            ]}],
            "imagePullSecrets": [{"name": "pull"}, {"name": "missing"}],
        }));
        let r = resolve(&p, &mut fake(), "10.1.2.3".parse().unwrap(), &tmp, &tmp)
            .await
            .unwrap();
        let env = env_of(&r.pod);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CFG_GREETING"), Some("override"));
        assert_eq!(get("CFG_file.txt"), Some("contents"));
        assert_eq!(get("LIT"), Some("1"));
        assert_eq!(get("POD"), Some("p"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("IP"), Some("10.1.2.3"));
        assert_eq!(get("G"), Some("hi"));
        assert_eq!(get("PW"), Some("s3cret"));
        assert_eq!(get("OPT"), None);
        assert_eq!(env.iter().filter(|(n, _)| n == "CFG_GREETING").count(), 1);
        let creds = r.creds.unwrap();
        assert!(creds.lookup("reg.example:5000").is_some());
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[tokio::test]
    async fn missing_references_say_what() {
        let tmp = std::env::temp_dir();
        let p = pod(json!({"containers": [{"name": "c", "image": "x", "env": [
            {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "NOPE"}}},
        ]}]}));
        let e = resolve(&p, &mut fake(), "10.0.0.1".parse().unwrap(), &tmp, &tmp)
            .await
            .unwrap_err();
        assert_eq!(e.0, "couldn't find key NOPE in ConfigMap ns/cfg");
        let p = pod(json!({"containers": [{"name": "c", "image": "x"}],
            "volumes": [{"name": "v", "secret": {"secretName": "absent"}}]}));
        let e = resolve(&p, &mut fake(), "10.0.0.1".parse().unwrap(), &tmp, &tmp)
            .await
            .unwrap_err();
        assert!(e.0.contains("secret \"absent\" not found"), "{e}");
    }

    #[tokio::test]
    async fn volumes_are_written() {
        let tmp = std::env::temp_dir().join(format!("wasinode-vol-{}", std::process::id()));
        let p = pod(json!({"containers": [{"name": "c", "image": "x"}],
        "volumes": [
            {"name": "conf", "configMap": {"name": "cfg", "items": [{"key": "file.txt", "path": "sub/f.txt"}]}},
            {"name": "sec", "secret": {"secretName": "sec"}},
            {"name": "evil", "configMap": {"name": "cfg", "items": [{"key": "file.txt", "path": "../x"}]}},
        ]}));
        let e = resolve(&p, &mut fake(), "10.0.0.1".parse().unwrap(), &tmp, &tmp)
            .await
            .unwrap_err();
        assert!(e.0.contains("stay in the volume"), "{e}");
        assert_eq!(
            std::fs::read_to_string(tmp.join("u1/conf/sub/f.txt")).unwrap(),
            "contents"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.join("u1/sec/PASSWORD")).unwrap(),
            "s3cret"
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
