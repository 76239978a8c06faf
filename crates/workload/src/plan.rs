//! Pod -> Plan: a pure, validated description of what a pod runs. Every error names the pod, the
//! field and the reason; it becomes a Failed status (and an Event in node mode), never a crash.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod};
use runtime::{AllowList, Preopen};
use serde::Deserialize;
use wagi::routes::RoutePattern;

pub const DEFAULT_HOST_ANNOTATION: &str = "alpha.wagi.krustlet.dev/default-host";
pub const MODULES_ANNOTATION: &str = "alpha.wagi.krustlet.dev/modules";
/// Outbound HTTP destinations of a pod that is not a WAGI pod (components, commands), in Spin's
/// `scheme://host:port` syntax with its wildcards, separated by commas or whitespace. Applies to
/// every container of the pod. Absent: nothing allowed.
pub const OUTBOUND_ANNOTATION: &str = "wasinode.dev/allowed-outbound-hosts";
/// Where an HTTP component listens when its container declares no TCP `containerPort`, as
/// runwasi does.
pub const DEFAULT_COMPONENT_PORT: u16 = 8080;

/// Identifies one pod instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("pod {pod}: {field}: {reason}")]
pub struct PlanError {
    pub pod: String,
    pub field: String,
    pub reason: String,
}

/// What a pod runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: PodKey,
    pub containers: Vec<ContainerPlan>,
    pub kind: PlanKind,
    /// Things worth telling the user that do not stop the pod (unknown annotation keys, ...).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum PlanKind {
    /// An HTTP listener serving the modules' routes.
    Wagi {
        listen: SocketAddr,
        routes: Vec<RoutePlan>,
    },
    /// Each container runs as a WASI command.
    Wasi { restart: RestartPolicy },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone)]
pub struct ContainerPlan {
    pub name: String,
    /// The image exactly as written in the pod.
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// argv after argv[0]: the container's `command` then `args`.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Preopen>,
    /// Where the container serves if its program is an HTTP component: each declared TCP
    /// `containerPort` on the pod's address, else [`DEFAULT_COMPONENT_PORT`].
    pub listen: Vec<SocketAddr>,
    /// Outbound destinations outside the WAGI table ([`OUTBOUND_ANNOTATION`]).
    pub allowed_hosts: Arc<AllowList>,
    /// `resources`: what the container asks for and may use.
    pub resources: Resources,
}

/// A container's `resources`, in bytes and millicores. Requests default to the limits, as the
/// API server defaults them (a pod read from a manifest file has not been through it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: u64,
    pub memory_request: u64,
    pub cpu_limit: Option<u64>,
    pub memory_limit: Option<u64>,
}

impl Resources {
    fn of(c: &Container, field: impl Fn(&str) -> String) -> Result<Resources, (String, String)> {
        let Some(r) = &c.resources else {
            return Ok(Resources::default());
        };
        let get = |map: &Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >,
                   which: &str,
                   name: &str,
                   cpu: bool|
         -> Result<Option<u64>, (String, String)> {
            let Some(q) = map.as_ref().and_then(|m| m.get(name)) else {
                return Ok(None);
            };
            let v = if cpu {
                crate::quantity::milli_value(&q.0)
            } else {
                crate::quantity::value(&q.0)
            };
            v.map(Some)
                .map_err(|e| (field(&format!("resources.{which}.{name}")), e.to_string()))
        };
        let cpu_limit = get(&r.limits, "limits", "cpu", true)?;
        let memory_limit = get(&r.limits, "limits", "memory", false)?;
        let cpu_request = get(&r.requests, "requests", "cpu", true)?.or(cpu_limit);
        let memory_request = get(&r.requests, "requests", "memory", false)?.or(memory_limit);
        let res = Resources {
            cpu_request: cpu_request.unwrap_or(0),
            memory_request: memory_request.unwrap_or(0),
            cpu_limit: cpu_limit.filter(|v| *v > 0),
            memory_limit: memory_limit.filter(|v| *v > 0),
        };
        for (name, request, limit) in [
            ("cpu", res.cpu_request, res.cpu_limit),
            ("memory", res.memory_request, res.memory_limit),
        ] {
            if limit.is_some_and(|l| request > l) {
                return Err((
                    field(&format!("resources.requests.{name}")),
                    "must be less than or equal to the limit".to_string(),
                ));
            }
        }
        Ok(res)
    }
}

/// One route of a WAGI pod, before `_routes` sub-routes are added.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    pub container: String,
    pub pattern: RoutePattern,
    pub entrypoint: String,
    /// WAGI's `argv` template (`${SCRIPT_NAME} ${ARGS}`), if the annotation gave one.
    pub argv: Option<String>,
    pub allowed_hosts: Arc<AllowList>,
}

/// What the planner needs from its surroundings.
#[derive(Debug, Clone, Default)]
pub struct PlanContext {
    /// Where a pod's emptyDir volumes live (`<dir>/<uid>/<volume>`).
    pub volume_dir: PathBuf,
    /// The node's address, which `hostNetwork` pods listen on when `default-host` names no IP.
    pub node_ip: Option<IpAddr>,
    /// When set, listeners whose address is unspecified (`0.0.0.0`, `::`, or a bare port) bind
    /// this address instead: a node that shares its host with other nodes (the local node-pool
    /// provisioner runs several on distinct loopback addresses) owns only its own address.
    pub bind_ip: Option<IpAddr>,
    /// Folder of the manifest the pod came from (relative hostPath volumes are not allowed, but
    /// relative images are resolved against it by the image resolver).
    pub base_dir: Option<PathBuf>,
    /// Which local image forms (`file://`, paths) a pod may name.
    pub local_images: LocalImages,
    /// Where secret volumes live (`<dir>/<uid>/<volume>`; a tmpfs where the host has one);
    /// `None`: under `volume_dir` like configMap volumes.
    pub secret_dir: Option<PathBuf>,
    /// The address HTTP components serve on (`--pod-address`); `None`: `bind_ip`, else
    /// `node_ip`, else 127.0.0.1.
    pub pod_address: Option<IpAddr>,
}

/// Which local files a pod's `image:` may name. An image names a file the agent reads and
/// runs, so in node mode (where pod authors are untrusted) only registries are allowed unless
/// the operator names a folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LocalImages {
    /// Any file (standalone mode: the manifest's author runs wasinode).
    #[default]
    Any,
    /// None: registry references only (node mode's default).
    Refused,
    /// Only files beneath this folder, resolved without leaving it (`--allow-local-images`).
    Beneath(PathBuf),
}

#[derive(Debug, Deserialize)]
struct ModuleSpec {
    route: Option<String>,
    #[serde(default)]
    allowed_hosts: Option<Vec<String>>,
    entrypoint: Option<String>,
    argv: Option<String>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_json::Value>,
}

pub fn pod_key(pod: &Pod) -> PodKey {
    let m = &pod.metadata;
    PodKey {
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        name: m.name.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
    }
}

/// Turns a pod into a plan, or says exactly what is wrong with it.
pub fn plan(pod: &Pod, ctx: &PlanContext) -> Result<Plan, PlanError> {
    let key = pod_key(pod);
    let err = |field: &str, reason: String| PlanError {
        pod: key.to_string(),
        field: field.to_string(),
        reason,
    };
    if key.name.is_empty() {
        return Err(err("metadata.name", "a pod needs a name".into()));
    }
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| err("spec", "missing".into()))?;
    if spec.containers.is_empty() {
        return Err(err(
            "spec.containers",
            "a pod needs at least one container".into(),
        ));
    }
    let mut warnings = Vec::new();
    let mut names = HashSet::new();
    let mut containers = Vec::new();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let outbound = match annotations.get(OUTBOUND_ANNOTATION) {
        None => AllowList::deny_all(),
        Some(text) => {
            let entries: Vec<&str> = text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|e| !e.is_empty())
                .collect();
            AllowList::parse_spin(&entries).map_err(|e| {
                err(
                    &format!("metadata.annotations[{OUTBOUND_ANNOTATION}]"),
                    e.to_string(),
                )
            })?
        }
    };
    let outbound = Arc::new(outbound);
    for (i, c) in spec.containers.iter().enumerate() {
        if !names.insert(c.name.clone()) {
            return Err(err(
                &format!("spec.containers[{i}].name"),
                format!("duplicate container name {:?}", c.name),
            ));
        }
        containers
            .push(container_plan(pod, c, i, ctx, &key, &outbound).map_err(|(f, r)| err(&f, r))?);
    }
    if spec.init_containers.as_ref().is_some_and(|v| !v.is_empty()) {
        warnings.push("initContainers are not supported and are ignored".into());
    }

    let modules = annotations.get(MODULES_ANNOTATION);
    let default_host = annotations.get(DEFAULT_HOST_ANNOTATION);
    let kind = match modules {
        None => {
            if default_host.is_some() {
                warnings.push(format!("{DEFAULT_HOST_ANNOTATION} is set but {MODULES_ANNOTATION} is not: running as WASI commands"));
            }
            let restart = match spec.restart_policy.as_deref() {
                None | Some("Always") => RestartPolicy::Always,
                Some("OnFailure") => RestartPolicy::OnFailure,
                Some("Never") => RestartPolicy::Never,
                Some(other) => {
                    return Err(err(
                        "spec.restartPolicy",
                        format!("{other:?} is not Always, OnFailure or Never"),
                    ));
                }
            };
            PlanKind::Wasi { restart }
        }
        Some(text) => {
            let field = format!("metadata.annotations[{MODULES_ANNOTATION}]");
            let parsed: BTreeMap<String, ModuleSpec> = serde_json::from_str(text).map_err(|e| {
                err(
                    &field,
                    format!("not a JSON object of {{container: {{route, ...}}}}: {e}"),
                )
            })?;
            let mut routes = Vec::new();
            let mut seen = HashSet::new();
            for (container, m) in parsed {
                if !names.contains(&container) {
                    return Err(err(
                        &field,
                        format!(
                            "module {container:?} names no container of this pod (containers: {})",
                            sorted(&names)
                        ),
                    ));
                }
                for k in m.unknown.keys() {
                    warnings.push(format!(
                        "{MODULES_ANNOTATION}: module {container:?}: unknown key {k:?} ignored"
                    ));
                }
                let route = m
                    .route
                    .ok_or_else(|| err(&field, format!("module {container:?} has no \"route\"")))?;
                let pattern = RoutePattern::parse(&route)
                    .map_err(|e| err(&field, format!("module {container:?}: {e}")))?;
                if !seen.insert(pattern.clone()) {
                    return Err(err(
                        &field,
                        format!("route {route:?} is claimed by more than one module"),
                    ));
                }
                let allowed = AllowList::parse(m.allowed_hosts.as_deref().unwrap_or(&[]))
                    .map_err(|e| err(&field, format!("module {container:?}: {e}")))?;
                routes.push(RoutePlan {
                    container,
                    pattern,
                    entrypoint: m.entrypoint.unwrap_or_else(|| "_start".into()),
                    argv: m.argv,
                    allowed_hosts: Arc::new(allowed),
                });
            }
            for n in &names {
                if !routes.iter().any(|r| &r.container == n) {
                    warnings.push(format!(
                        "container {n:?} has no route in {MODULES_ANNOTATION}: it is not served"
                    ));
                }
            }
            let listen = listen_addr(
                default_host.map(String::as_str),
                spec.host_network.unwrap_or(false),
                ctx,
            )
            .map_err(|r| {
                err(
                    &format!("metadata.annotations[{DEFAULT_HOST_ANNOTATION}]"),
                    r,
                )
            })?;
            PlanKind::Wagi { listen, routes }
        }
    };
    for (k, _) in annotations
        .iter()
        .filter(|(k, _)| k.starts_with("alpha.wagi.krustlet.dev/"))
    {
        if k != MODULES_ANNOTATION && k != DEFAULT_HOST_ANNOTATION {
            warnings.push(format!("unknown annotation {k:?} ignored"));
        }
    }
    Ok(Plan {
        key,
        containers,
        kind,
        warnings,
    })
}

fn sorted(names: &HashSet<String>) -> String {
    let mut v: Vec<&str> = names.iter().map(String::as_str).collect();
    v.sort();
    v.join(", ")
}

/// `IP:port` as in the seed; a bare `:port` or a port alone listens on the node IP for
/// `hostNetwork` pods and on 0.0.0.0 otherwise. Missing: WAGI's default, port 3000.
fn listen_addr(
    value: Option<&str>,
    host_network: bool,
    ctx: &PlanContext,
) -> Result<SocketAddr, String> {
    let fallback_ip = match (host_network, ctx.node_ip) {
        (true, Some(ip)) => ip,
        _ => IpAddr::from([0, 0, 0, 0]),
    };
    let confine = |addr: SocketAddr| match ctx.bind_ip {
        Some(ip) if addr.ip().is_unspecified() => SocketAddr::new(ip, addr.port()),
        _ => addr,
    };
    let Some(v) = value.map(str::trim) else {
        return Ok(confine(SocketAddr::new(fallback_ip, 3000)));
    };
    if let Ok(addr) = v.parse::<SocketAddr>() {
        return Ok(confine(addr));
    }
    let port_text = v.strip_prefix(':').unwrap_or(v);
    match port_text.parse::<u16>() {
        Ok(port) => Ok(confine(SocketAddr::new(fallback_ip, port))),
        Err(_) => Err(format!(
            "{v:?} is not IP:port (for example \"0.0.0.0:3001\")"
        )),
    }
}

fn container_plan(
    pod: &Pod,
    c: &Container,
    i: usize,
    ctx: &PlanContext,
    key: &PodKey,
    outbound: &Arc<AllowList>,
) -> Result<ContainerPlan, (String, String)> {
    let field = |f: &str| format!("spec.containers[{i}].{f}");
    let image = c
        .image
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| (field("image"), "missing".to_string()))?;
    let mut env = Vec::new();
    for (j, e) in c.env.iter().flatten().enumerate() {
        match (&e.value, &e.value_from) {
            (_, Some(_)) => {
                return Err((
                    field(&format!("env[{j}]")),
                    format!(
                        "{}: valueFrom must be resolved before planning (supported by the node agent, not in standalone mode)",
                        e.name
                    ),
                ));
            }
            (v, None) => env.push((e.name.clone(), v.clone().unwrap_or_default())),
        }
    }
    if c.env_from.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err((
            field("envFrom"),
            "envFrom must be resolved before planning".into(),
        ));
    }
    let mut args = Vec::new();
    args.extend(c.command.iter().flatten().cloned());
    args.extend(c.args.iter().flatten().cloned());
    let mut mounts = Vec::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
        let vf = field(&format!("volumeMounts[{j}]"));
        let vol = volumes.iter().find(|v| v.name == m.name).ok_or_else(|| {
            (
                vf.clone(),
                format!("volume {:?} is not defined in spec.volumes", m.name),
            )
        })?;
        let host = if let Some(hp) = &vol.host_path {
            let p = PathBuf::from(&hp.path);
            if !p.is_absolute() {
                return Err((vf, format!("hostPath {:?} must be absolute", hp.path)));
            }
            p
        } else if vol.empty_dir.is_some() {
            ctx.volume_dir
                .join(if key.uid.is_empty() {
                    &key.name
                } else {
                    &key.uid
                })
                .join(&vol.name)
        } else if vol.config_map.is_some() {
            // The node agent materialises these into `volume_dir/<uid>/<name>` before planning.
            ctx.volume_dir.join(&key.uid).join(&vol.name)
        } else if vol.secret.is_some() {
            ctx.secret_dir
                .as_ref()
                .unwrap_or(&ctx.volume_dir)
                .join(&key.uid)
                .join(&vol.name)
        } else {
            return Err((
                vf,
                format!(
                    "volume {:?}: only hostPath, emptyDir, configMap and secret volumes are supported",
                    vol.name
                ),
            ));
        };
        if !Path::new(&m.mount_path).is_absolute() {
            return Err((vf, format!("mountPath {:?} must be absolute", m.mount_path)));
        }
        // As the kubelet mounts them: configMap and secret volumes are read-only whatever the
        // mount says (the agent writes them; a guest must not plant anything there).
        let api_volume = vol.config_map.is_some() || vol.secret.is_some();
        mounts.push(Preopen {
            host,
            guest: m.mount_path.clone(),
            read_only: api_volume || m.read_only.unwrap_or(false),
        });
    }
    let pod_ip = ctx
        .pod_address
        .or(ctx.bind_ip)
        .or(ctx.node_ip)
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let mut listen = Vec::new();
    for (j, p) in c.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
            continue;
        }
        let port = u16::try_from(p.container_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                (
                    field(&format!("ports[{j}].containerPort")),
                    format!("{} is not a port (1-65535)", p.container_port),
                )
            })?;
        let addr = SocketAddr::new(pod_ip, port);
        if !listen.contains(&addr) {
            listen.push(addr);
        }
    }
    if listen.is_empty() {
        listen.push(SocketAddr::new(pod_ip, DEFAULT_COMPONENT_PORT));
    }
    Ok(ContainerPlan {
        name: c.name.clone(),
        image,
        image_pull_policy: c.image_pull_policy.clone(),
        args,
        env,
        mounts,
        listen,
        allowed_hosts: outbound.clone(),
        resources: Resources::of(c, field)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test pod: {e}"))
    }

    const SEED: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: krustlet-wagi-demo
  annotations:
    alpha.wagi.krustlet.dev/default-host: "0.0.0.0:3001"
    alpha.wagi.krustlet.dev/modules: |
      {
        "krustlet-wagi-demo-http-example": {"route": "/http-example", "allowed_hosts": ["https://api.brigade.sh"]},
        "krustlet-wagi-demo-hello": {"route": "/hello/..."},
        "krustlet-wagi-demo-error": {"route": "/error"},
        "krustlet-wagi-demo-log": {"route": "/log"},
        "krustlet-wagi-demo-index": {"route": "/"}
      }
spec:
  containers:
    - {name: krustlet-wagi-demo-http-example, image: a.wasm}
    - {name: krustlet-wagi-demo-hello, image: b.wasm}
    - {name: krustlet-wagi-demo-index, image: c.wasm}
    - {name: krustlet-wagi-demo-error, image: d.wasm}
    - {name: krustlet-wagi-demo-log, image: e.wasm}
"#;

    #[test]
    fn seed_pod_plans_to_five_routes_on_3001() {
        let p = plan(&pod(SEED), &PlanContext::default()).unwrap_or_else(|e| panic!("{e}"));
        let PlanKind::Wagi { listen, routes } = &p.kind else {
            panic!("not wagi")
        };
        assert_eq!(listen.to_string(), "0.0.0.0:3001");
        assert_eq!(routes.len(), 5);
        let http = routes
            .iter()
            .find(|r| r.container.ends_with("http-example"))
            .map(|r| r.allowed_hosts.clone());
        assert!(http.is_some_and(|a| !a.is_empty()));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn broken_modules_json_names_pod_annotation_and_reason() {
        let y = SEED.replace("\"/hello/...\"}", "\"/hello/...\"");
        let e = plan(&pod(&y), &PlanContext::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("default/krustlet-wagi-demo"), "{e}");
        assert!(e.contains(MODULES_ANNOTATION), "{e}");
        assert!(e.contains("JSON"), "{e}");
    }

    #[test]
    fn module_without_container_route_clash_and_bad_host_are_errors() {
        let y = SEED.replace("krustlet-wagi-demo-log\": {", "nope\": {");
        let e = plan(&pod(&y), &PlanContext::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("\"nope\" names no container"), "{e}");
        let y = SEED.replace("\"/error\"", "\"/log\"");
        let e = plan(&pod(&y), &PlanContext::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("claimed by more than one"), "{e}");
        let y = SEED.replace("0.0.0.0:3001", "somewhere");
        let e = plan(&pod(&y), &PlanContext::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(DEFAULT_HOST_ANNOTATION) && e.contains("somewhere"),
            "{e}"
        );
        let y = SEED.replace("https://api.brigade.sh", "ftp://x");
        assert!(plan(&pod(&y), &PlanContext::default()).is_err());
    }

    #[test]
    fn unknown_keys_warn() {
        let y = SEED.replace(
            "{\"route\": \"/error\"}",
            "{\"route\": \"/error\", \"volumes\": {}}",
        );
        let p = plan(&pod(&y), &PlanContext::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            p.warnings.iter().any(|w| w.contains("\"volumes\"")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn plain_pod_is_wasi_with_restart_policy_args_env_and_mounts() {
        let p = plan(
            &pod(r#"
metadata: {name: job, uid: u1}
spec:
  restartPolicy: OnFailure
  containers:
    - name: main
      image: m.wasm
      command: [run]
      args: ["--x", "1"]
      env: [{name: APP_A, value: "b"}]
      volumeMounts: [{name: data, mountPath: /data, readOnly: true}, {name: scratch, mountPath: /tmp}]
  volumes:
    - {name: data, hostPath: {path: /srv/data}}
    - {name: scratch, emptyDir: {}}
"#),
            &PlanContext { volume_dir: PathBuf::from("/v"), ..Default::default() },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            p.kind,
            PlanKind::Wasi {
                restart: RestartPolicy::OnFailure
            }
        ));
        let c = &p.containers[0];
        assert_eq!(c.args, vec!["run", "--x", "1"]);
        assert_eq!(c.env, vec![("APP_A".to_string(), "b".to_string())]);
        assert_eq!(c.mounts[0].host, PathBuf::from("/srv/data"));
        assert!(c.mounts[0].read_only);
        assert_eq!(c.mounts[1].host, PathBuf::from("/v/u1/scratch"));
    }

    #[test]
    fn host_network_pods_listen_on_the_node_ip_for_a_bare_port() {
        let ctx = PlanContext {
            node_ip: Some(IpAddr::from([127, 0, 0, 9])),
            ..Default::default()
        };
        assert_eq!(
            listen_addr(Some(":3001"), true, &ctx),
            Ok("127.0.0.9:3001".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            listen_addr(Some("3001"), false, &ctx).map(|a| a.ip().is_unspecified()),
            Ok(true)
        );
        assert_eq!(listen_addr(None, false, &ctx).map(|a| a.port()), Ok(3000));
    }

    #[test]
    fn a_bind_ip_confines_unspecified_listeners_only() {
        let ip = IpAddr::from([127, 100, 0, 2]);
        let ctx = PlanContext {
            bind_ip: Some(ip),
            ..Default::default()
        };
        let at = |v| listen_addr(Some(v), false, &ctx);
        assert_eq!(at("0.0.0.0:3001"), Ok(SocketAddr::new(ip, 3001)));
        assert_eq!(at("[::]:3001"), Ok(SocketAddr::new(ip, 3001)));
        assert_eq!(at(":3002"), Ok(SocketAddr::new(ip, 3002)));
        assert_eq!(
            at("127.0.0.1:3003").map(|a| a.ip()),
            Ok(IpAddr::from([127, 0, 0, 1]))
        );
        assert_eq!(listen_addr(None, false, &ctx).map(|a| a.ip()), Ok(ip));
    }

    #[test]
    fn resources_are_read_with_requests_defaulting_to_limits() {
        let p = plan(
            &pod(r#"
metadata: {name: r, uid: u1}
spec:
  containers:
    - name: a
      image: m.wasm
      resources: {limits: {memory: 16Mi, cpu: 250m}}
    - name: b
      image: m.wasm
      resources: {requests: {cpu: "0.1", memory: 1G}}
"#),
            &PlanContext::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.containers[0].resources,
            Resources {
                cpu_request: 250,
                memory_request: 16 << 20,
                cpu_limit: Some(250),
                memory_limit: Some(16 << 20),
            }
        );
        assert_eq!(
            p.containers[1].resources,
            Resources {
                cpu_request: 100,
                memory_request: 1_000_000_000,
                cpu_limit: None,
                memory_limit: None,
            }
        );
    }

    #[test]
    fn a_bad_quantity_or_a_request_over_its_limit_names_the_field() {
        let bad = |res: &str| {
            let y = format!(
                "metadata: {{name: r}}\nspec:\n  containers:\n    - name: a\n      image: m.wasm\n      resources: {res}\n"
            );
            plan(&pod(&y), &PlanContext::default())
                .map(|_| ())
                .expect_err("must be refused")
        };
        let e = bad("{limits: {memory: 12 pieces}}");
        assert_eq!(e.field, "spec.containers[0].resources.limits.memory");
        assert!(e.reason.contains("not a quantity"), "{e}");
        let e = bad("{requests: {cpu: 2}, limits: {cpu: 1}}");
        assert_eq!(e.field, "spec.containers[0].resources.requests.cpu");
    }
}
