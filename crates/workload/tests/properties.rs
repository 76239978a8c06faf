//! Property tests for what a pod author writes: manifest files ([`manifest::load`]) and the
//! pods that [`plan::plan`] turns into plans, the WAGI annotations above all.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use runtime::AllowList;
use serde_json::{Value, json};
use wagi::routes::RoutePattern;
use workload::PlanContext;
use workload::manifest::{self, ManifestError};
use workload::plan::{self, DEFAULT_HOST_ANNOTATION, MODULES_ANNOTATION, PlanKind};

const ALPHA: &str = "alpha.wagi.krustlet.dev/";

fn load_text(text: &str) -> Result<(Vec<manifest::ManifestPod>, Vec<String>), ManifestError> {
    let dir = tempfile::tempdir().map_err(|source| ManifestError::Read {
        path: "tempdir".into(),
        source,
    })?;
    let path = dir.path().join("pods.yaml");
    std::fs::write(&path, text).map_err(|source| ManifestError::Read {
        path: path.clone(),
        source,
    })?;
    manifest::load(&path)
}

/// Pieces of what YAML and pod manifests are made of.
fn yaml_piece() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("apiVersion: v1\n"),
        Just("kind: Pod\n"),
        Just("kind: ConfigMap\n"),
        Just("---\n"),
        Just("...\n"),
        Just("metadata:\n"),
        Just("  name: p\n"),
        Just("  namespace: n\n"),
        Just("  annotations: {a: b}\n"),
        Just("spec:\n"),
        Just("  containers:\n"),
        Just("  - name: c\n"),
        Just("    image: m.wasm\n"),
        Just("{"),
        Just("}"),
        Just("["),
        Just("]"),
        Just(": "),
        Just(", "),
        Just("- "),
        Just("  "),
        Just("\n"),
        Just("&a "),
        Just("*a "),
        Just("!!str "),
        Just("!!binary "),
        Just("? "),
        Just("\""),
        Just("'"),
        Just("|\n"),
        Just("%YAML 1.2\n"),
        Just("<<: *a\n"),
        Just("\t"),
        Just("\u{feff}"),
        Just("null"),
        Just("1e400"),
        Just("-1"),
    ]
    .prop_map(str::to_string);
    prop_oneof![9 => piece, 1 => "\\PC{0,6}"]
}

/// Text made of those pieces.
fn yaml_ish() -> impl Strategy<Value = String> {
    prop::collection::vec(yaml_piece(), 0..40).prop_map(|v| v.concat())
}

/// A valid manifest (YAML or JSON) with a few pieces inserted, bytes deleted or replaced.
fn mutated_manifest() -> impl Strategy<Value = String> {
    let edit = (
        any::<prop::sample::Index>(),
        0u8..3,
        yaml_piece(),
        0usize..8,
    );
    (
        manifest_pod(),
        any::<bool>(),
        prop::collection::vec(edit, 0..4),
    )
        .prop_map(|(pod, json, edits)| {
            let mut t = if json {
                serde_json::to_string_pretty(&pod).unwrap_or_default()
            } else {
                serde_yaml::to_string(&pod).unwrap_or_default()
            };
            for (at, op, piece, n) in edits {
                let floor = |t: &str, mut i: usize| {
                    while !t.is_char_boundary(i) {
                        i -= 1;
                    }
                    i
                };
                let start = floor(&t, at.index(t.len() + 1));
                let end = floor(&t, (start + n).min(t.len()));
                match op {
                    0 => t.insert_str(start, &piece),
                    1 => t.replace_range(start..end, ""),
                    _ => t.replace_range(start..end, &piece),
                }
            }
            t
        })
}

/// Where in `pod` (as JSON) a plan error's `field` points: `Some(true)` if it names a value
/// the pod has, `Some(false)` if it names a missing member of an object the pod has (`image`
/// of a container without one), `None` if it names nothing in this pod.
fn resolve(pod: &Value, field: &str) -> Option<bool> {
    let mut segments = Vec::new();
    let mut rest = field;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        if end > 0 {
            segments.push(&rest[..end]);
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix('[') {
            let close = r.find(']')?;
            segments.push(&r[..close]);
            rest = &r[close + 1..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    if !matches!(segments.first(), Some(&"metadata") | Some(&"spec")) {
        return None;
    }
    let mut at = pod;
    for (i, s) in segments.iter().enumerate() {
        let next = match at {
            Value::Object(m) => m.get(*s),
            Value::Array(a) => a.get(s.parse::<usize>().ok()?),
            _ => return None,
        };
        match next {
            Some(v) => at = v,
            None if i + 1 == segments.len() && at.is_object() => return Some(false),
            None => return None,
        }
    }
    Some(true)
}

/// A pod as JSON, with every part a pod author may write drawn from valid and invalid values.
fn pod_json() -> impl Strategy<Value = Value> {
    let env = (
        prop_oneof![Just("A"), Just("B"), Just("")],
        prop::option::of("\\PC{0,6}"),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(name, value, from)| {
            let mut e = json!({ "name": name });
            if let Some(v) = value {
                e["value"] = json!(v);
            }
            if from {
                e["valueFrom"] = json!({"fieldRef": {"fieldPath": "metadata.name"}});
            }
            e
        });
    let mount = (
        prop_oneof![4 => Just("v0"), 4 => Just("v1"), 1 => Just("nope")],
        prop_oneof![4 => Just("/data"), 4 => Just("/"), 1 => Just("rel"), 1 => Just("")],
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(name, path, ro)| {
            let mut m = json!({ "name": name, "mountPath": path });
            if let Some(ro) = ro {
                m["readOnly"] = json!(ro);
            }
            m
        });
    let container = (
        prop_oneof![Just("a"), Just("b"), Just("c"), Just("a")],
        prop::option::weighted(
            0.95,
            prop_oneof![
                6 => Just("m.wasm"),
                6 => Just("r.io/m:1"),
                1 => Just(""),
                1 => Just("  ")
            ],
        ),
        prop::collection::vec(env, 0..3),
        prop::bool::weighted(0.05),
        prop::option::of(prop::collection::vec("\\PC{0,4}", 0..3)),
        prop::collection::vec(mount, 0..2),
    )
        .prop_map(|(name, image, env, env_from, args, mounts)| {
            let mut c = json!({ "name": name, "env": env, "volumeMounts": mounts });
            if let Some(i) = image {
                c["image"] = json!(i);
            }
            if env_from {
                c["envFrom"] = json!([{"configMapRef": {"name": "x"}}]);
            }
            if let Some(a) = args {
                c["args"] = json!(a);
            }
            c
        });
    let volume = (
        prop_oneof![Just("v0"), Just("v1")],
        prop_oneof![
            4 => Just(json!({"hostPath": {"path": "/srv"}})),
            1 => Just(json!({"hostPath": {"path": "srv"}})),
            4 => Just(json!({"emptyDir": {}})),
            4 => Just(json!({"configMap": {"name": "cm"}})),
            4 => Just(json!({"secret": {"secretName": "s"}})),
            1 => Just(json!({"nfs": {"server": "s", "path": "/p"}})),
            1 => Just(json!({})),
        ],
    )
        .prop_map(|(name, mut v)| {
            v["name"] = json!(name);
            v
        });
    (
        prop::option::weighted(
            0.97,
            prop_oneof![8 => Just("p".to_string()), 1 => Just(String::new()), 1 => "\\PC{1,8}"],
        ),
        prop::option::of("[a-z]{1,6}"),
        annotations(),
        prop::bool::weighted(0.97),
        prop_oneof![1 => Just(Vec::new()), 19 => prop::collection::vec(container, 1..4)],
        prop::collection::vec(volume, 0..3),
        prop::option::of(prop_oneof![
            3 => Just("Always".to_string()),
            3 => Just("OnFailure".to_string()),
            3 => Just("Never".to_string()),
            1 => "\\PC{0,8}"
        ]),
        prop::bool::weighted(0.1),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            |(
                name,
                ns,
                annotations,
                has_spec,
                containers,
                volumes,
                restart,
                init,
                host_network,
            )| {
                let mut pod = json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": { "annotations": annotations },
                });
                if let Some(n) = name {
                    pod["metadata"]["name"] = json!(n);
                }
                if let Some(ns) = ns {
                    pod["metadata"]["namespace"] = json!(ns);
                }
                if has_spec {
                    let mut spec = json!({ "containers": containers, "volumes": volumes });
                    if let Some(r) = restart {
                        spec["restartPolicy"] = json!(r);
                    }
                    if init {
                        spec["initContainers"] = json!([{"name": "i", "image": "i.wasm"}]);
                    }
                    if let Some(h) = host_network {
                        spec["hostNetwork"] = json!(h);
                    }
                    pod["spec"] = spec;
                }
                pod
            },
        )
}

/// A route a module may claim, valid or not.
fn route() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("/".to_string()),
        1 => Just("/a/...".to_string()),
        1 => Just("/...".to_string()),
        12 => "/[a-z0-9]{1,3}(/\\.\\.\\.)?",
        1 => Just("a".to_string()),
        1 => Just(String::new()),
        1 => "/[ -~]{0,6}",
        1 => "[ -~]{0,6}",
    ]
}

/// An `allowed_hosts` entry, valid or not.
fn allowed_host() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("https://api.example.com".to_string()),
        4 => Just("http://127.0.0.1:8080".to_string()),
        2 => Just("insecure:allow-all".to_string()),
        4 => "https?://[a-z0-9.-]{1,10}(:[0-9]{1,5})?(/[ -~]{0,4})?",
        1 => Just("ftp://x".to_string()),
        1 => Just("not a url".to_string()),
        1 => Just("http://".to_string()),
        1 => "[ -~]{0,12}",
    ]
}

/// One module of the modules annotation, as a pod author may write it.
#[derive(Debug, Clone)]
struct Module {
    route: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    entrypoint: Option<String>,
    argv: Option<String>,
    extra: Option<String>,
}

fn module() -> impl Strategy<Value = Module> {
    (
        prop::option::weighted(0.97, route()),
        prop::option::of(prop::collection::vec(allowed_host(), 0..3)),
        prop::option::of("[a-z_]{1,8}"),
        prop::option::of("[ -~]{0,12}"),
        prop::option::weighted(
            0.2,
            "[a-z]{1,8}".prop_filter("known", |k| {
                !["route", "allowed_hosts", "entrypoint", "argv"].contains(&k.as_str())
            }),
        ),
    )
        .prop_map(|(route, allowed_hosts, entrypoint, argv, extra)| Module {
            route,
            allowed_hosts,
            entrypoint,
            argv,
            extra,
        })
}

impl Module {
    fn to_json(&self) -> Value {
        let mut m = json!({});
        if let Some(r) = &self.route {
            m["route"] = json!(r);
        }
        if let Some(h) = &self.allowed_hosts {
            m["allowed_hosts"] = json!(h);
        }
        if let Some(e) = &self.entrypoint {
            m["entrypoint"] = json!(e);
        }
        if let Some(a) = &self.argv {
            m["argv"] = json!(a);
        }
        if let Some(k) = &self.extra {
            m[k] = json!({"any": [1, "thing"]});
        }
        m
    }
}

/// `default-host` values that are an address to listen on, and values that are not.
fn default_host() -> impl Strategy<Value = (String, bool)> {
    prop_oneof![
        Just(("0.0.0.0:3001".to_string(), true)),
        Just((":3002".to_string(), true)),
        Just(("3003".to_string(), true)),
        Just(("[::1]:80".to_string(), true)),
        Just((" 127.0.0.1:1 ".to_string(), true)),
        Just(("somewhere".to_string(), false)),
        Just(("1.2.3.4".to_string(), false)),
        Just((":".to_string(), false)),
        Just((String::new(), false)),
        Just(("65536".to_string(), false)),
        Just(("0.0.0.0:-1".to_string(), false)),
        Just(("host:80".to_string(), false)),
    ]
}

/// Annotations as a pod author may write them: the WAGI ones (as arbitrary text or as a
/// JSON object of modules), unknown `alpha.wagi.krustlet.dev/` ones, and any other.
fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let modules = prop_oneof![
        "\\PC{0,24}",
        prop::collection::btree_map(
            prop_oneof![Just("a"), Just("b"), Just("c"), Just("nope")],
            module(),
            0..4
        )
        .prop_map(|m| {
            let o: serde_json::Map<String, Value> = m
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_json()))
                .collect();
            Value::Object(o).to_string()
        }),
    ];
    (
        prop::option::of(modules),
        prop::option::of(prop_oneof![
            default_host().prop_map(|(h, _)| h),
            "\\PC{0,12}"
        ]),
        prop::collection::btree_map("[a-z./-]{1,16}", "\\PC{0,8}", 0..3),
    )
        .prop_map(|(modules, host, mut other)| {
            if let Some(m) = modules {
                other.insert(MODULES_ANNOTATION.into(), m);
            }
            if let Some(h) = host {
                other.insert(DEFAULT_HOST_ANNOTATION.into(), h);
            }
            other
        })
}

/// A valid pod with containers `c0..cN`, and nothing else that could be wrong.
fn valid_pod(containers: usize, annotations: &BTreeMap<String, String>) -> Pod {
    let containers: Vec<Value> = (0..containers)
        .map(|i| json!({"name": format!("c{i}"), "image": format!("m{i}.wasm")}))
        .collect();
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "annotations": annotations},
        "spec": {"containers": containers},
    });
    serde_json::from_value(pod).unwrap_or_default()
}

/// A pod as a manifest author writes it (JSON or YAML), with every string a user may type.
fn manifest_pod() -> impl Strategy<Value = Pod> {
    (
        "[a-z][a-z0-9-]{0,10}",
        prop::option::of("[a-z]{1,8}"),
        prop::option::of("[a-z0-9-]{1,12}"),
        prop::collection::btree_map(
            "[a-z./-]{1,16}",
            "\\PC{0,16}|[\n\t \"':#&*!|>%@`{}-]{0,8}",
            0..4,
        ),
        prop::collection::vec(
            (
                "[a-z]{1,6}",
                "\\PC{1,12}",
                prop::collection::vec("\\PC{0,8}", 0..3),
            ),
            1..3,
        ),
    )
        .prop_map(|(name, ns, uid, annotations, containers)| {
            let containers: Vec<Value> = containers
                .into_iter()
                .map(|(n, image, args)| json!({"name": n, "image": image, "args": args}))
                .collect();
            let mut meta = json!({"name": name, "annotations": annotations});
            if let Some(ns) = ns {
                meta["namespace"] = json!(ns);
            }
            if let Some(uid) = uid {
                meta["uid"] = json!(uid);
            }
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"containers": containers},
            });
            serde_json::from_value(pod).unwrap_or_default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any file is read or refused with an error that names it; what is read is only Pods,
    /// each with a namespace and a uid, and every other kind is a warning.
    #[test]
    fn manifest_load_never_panics(text in prop_oneof![yaml_ish(), mutated_manifest()]) {
        match load_text(&text) {
            Ok((pods, warnings)) => {
                for p in &pods {
                    prop_assert!(p.pod.metadata.namespace.is_some());
                    prop_assert!(p.pod.metadata.uid.is_some());
                }
                for w in &warnings {
                    prop_assert!(w.contains("is not a Pod"), "{w}");
                }
            }
            Err(e) => {
                prop_assert!(matches!(e, ManifestError::Parse { .. }), "{e}");
                prop_assert!(e.to_string().contains("pods.yaml"), "{e}");
            }
        }
    }

    /// A file of pods (YAML or JSON documents, among other kinds and empty documents) reads
    /// back as exactly those pods, in order, defaulted as documented: namespace `default`, and
    /// a uid derived from namespace and name when none is given.
    #[test]
    fn manifest_reads_back_the_pods_written(
        docs in prop::collection::vec(
            (manifest_pod(), 0u8..4),
            1..5,
        ),
    ) {
        let mut text = String::new();
        let mut others = 0;
        for (pod, how) in &docs {
            let doc = match how {
                0 => serde_json::to_string(pod).map_err(|e| TestCaseError::fail(e.to_string()))?,
                1 => serde_json::to_string_pretty(pod).map_err(|e| TestCaseError::fail(e.to_string()))?,
                _ => serde_yaml::to_string(pod).map_err(|e| TestCaseError::fail(e.to_string()))?,
            };
            text.push_str("---\n");
            text.push_str(&doc);
            text.push('\n');
            if *how == 3 {
                text.push_str("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n");
                others += 1;
            }
        }
        let (pods, warnings) = load_text(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(warnings.len(), others);
        prop_assert_eq!(pods.len(), docs.len());
        for (got, (want, _)) in pods.iter().zip(&docs) {
            let mut want = want.clone();
            want.metadata.namespace.get_or_insert_with(|| "default".into());
            let uid = got.pod.metadata.uid.clone().unwrap_or_default();
            match &want.metadata.uid {
                Some(u) => prop_assert_eq!(&uid, u),
                None => {
                    let hex = uid.strip_prefix("local-").unwrap_or_default();
                    prop_assert!(hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{uid}");
                    // Stable: the same namespace and name give the same uid.
                    for other in &pods {
                        if other.pod.metadata.namespace == want.metadata.namespace
                            && other.pod.metadata.name == want.metadata.name
                            && other.pod.metadata.uid.as_deref().is_some_and(|u| u.starts_with("local-"))
                        {
                            prop_assert_eq!(other.pod.metadata.uid.as_deref(), Some(uid.as_str()));
                        }
                    }
                    want.metadata.uid = Some(uid);
                }
            }
            prop_assert_eq!(&got.pod, &want, "{}", text);
        }
    }

    /// Whatever a pod says, planning it never panics, and a refusal names the pod and a field
    /// that is in the pod (or the missing member of an object that is).
    #[test]
    fn plan_errors_name_a_field_of_the_pod(pod in pod_json(), node_ip in any::<bool>()) {
        let Ok(typed) = serde_json::from_value::<Pod>(pod.clone()) else {
            return Err(TestCaseError::fail(format!("not a Pod: {pod}")));
        };
        let ctx = PlanContext {
            volume_dir: "/v".into(),
            node_ip: node_ip.then(|| [10, 0, 0, 1].into()),
            ..PlanContext::default()
        };
        let shown = serde_json::to_value(&typed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match plan::plan(&typed, &ctx) {
            Ok(p) => {
                prop_assert!(!p.key.name.is_empty());
                prop_assert_eq!(p.containers.len(), typed.spec.as_ref().map_or(0, |s| s.containers.len()));
                if let PlanKind::Wagi { routes, .. } = &p.kind {
                    for r in routes {
                        prop_assert!(p.containers.iter().any(|c| c.name == r.container));
                    }
                }
            }
            Err(e) => {
                let ns = typed.metadata.namespace.as_deref().unwrap_or("default");
                let name = typed.metadata.name.as_deref().unwrap_or_default();
                prop_assert_eq!(&e.pod, &format!("{ns}/{name}"));
                prop_assert!(
                    resolve(&shown, &e.field).is_some(),
                    "{e}: field {:?} is not in {shown}", e.field
                );
                prop_assert!(e.to_string().contains(&e.field), "{e}");
            }
        }
    }

    /// On a pod whose only fault can be its annotations, the modules annotation is read as
    /// WAGI reads it: a plan with exactly its routes (each route, allow-list, entrypoint and
    /// argv as written), listening where `default-host` says; or a refusal that names the
    /// annotation at fault.
    #[test]
    fn wagi_annotations_plan_as_written(
        containers in 1usize..4,
        modules in prop::collection::btree_map(
            prop_oneof![4 => Just("c0"), 4 => Just("c1"), 4 => Just("c2"), 1 => Just("c3"), 1 => Just("nope")],
            module(),
            0..4,
        ),
        host in prop::option::of(default_host()),
        unknown in prop::option::of("[a-z-]{1,8}"),
    ) {
        let text = Value::Object(modules.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect()).to_string();
        let mut ann = BTreeMap::from([(MODULES_ANNOTATION.to_string(), text.clone())]);
        if let Some((h, _)) = &host {
            ann.insert(DEFAULT_HOST_ANNOTATION.into(), h.clone());
        }
        if let Some(u) = &unknown {
            ann.insert(format!("{ALPHA}{u}"), "x".into());
        }
        let pod = valid_pod(containers, &ann);
        let names: Vec<String> = (0..containers).map(|i| format!("c{i}")).collect();
        // The modules are valid if every one names a container and has a valid route of its
        // own and a valid allow-list.
        let mut patterns = Vec::new();
        let mut modules_ok = true;
        for (c, m) in &modules {
            let pattern = m.route.as_deref().map(RoutePattern::parse);
            let hosts = AllowList::parse(m.allowed_hosts.as_deref().unwrap_or(&[]));
            match pattern {
                Some(Ok(p)) if names.contains(&c.to_string()) && hosts.is_ok() && !patterns.contains(&p) => {
                    patterns.push(p)
                }
                _ => modules_ok = false,
            }
        }
        let host_ok = host.as_ref().is_none_or(|(_, ok)| *ok);
        let got = plan::plan(&pod, &PlanContext::default());
        match got {
            Ok(p) => {
                prop_assert!(modules_ok && host_ok, "{text} {host:?}: planned {p:?}");
                let PlanKind::Wagi { listen, routes } = &p.kind else {
                    return Err(TestCaseError::fail(format!("not WAGI: {p:?}")));
                };
                prop_assert_eq!(listen.port(), match host.as_ref().map(|(h, _)| h.trim()) {
                    None => 3000,
                    Some(h) => h.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0),
                });
                prop_assert_eq!(routes.len(), modules.len());
                for r in routes {
                    let m = &modules[r.container.as_str()];
                    let want = m.route.as_deref().map(RoutePattern::parse);
                    prop_assert_eq!(Some(&r.pattern), want.as_ref().and_then(|w| w.as_ref().ok()));
                    let hosts = AllowList::parse(m.allowed_hosts.as_deref().unwrap_or(&[]))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&*r.allowed_hosts, &hosts);
                    prop_assert_eq!(&r.entrypoint, m.entrypoint.as_deref().unwrap_or("_start"));
                    prop_assert_eq!(&r.argv, &m.argv);
                }
                for n in &names {
                    if !modules.contains_key(n.as_str()) {
                        prop_assert!(p.warnings.iter().any(|w| w.contains(n.as_str()) && w.contains("not served")), "{:?}", p.warnings);
                    }
                }
                for (c, m) in &modules {
                    if let Some(k) = &m.extra {
                        prop_assert!(p.warnings.iter().any(|w| w.contains(c) && w.contains(k.as_str())), "{:?}", p.warnings);
                    }
                }
                if let Some(u) = &unknown {
                    prop_assert!(p.warnings.iter().any(|w| w.contains(&format!("{ALPHA}{u}"))), "{:?}", p.warnings);
                }
            }
            Err(e) => {
                prop_assert!(!(modules_ok && host_ok), "{text} {host:?}: refused: {e}");
                let at_modules = e.field == format!("metadata.annotations[{MODULES_ANNOTATION}]");
                let at_host = e.field == format!("metadata.annotations[{DEFAULT_HOST_ANNOTATION}]");
                prop_assert!(at_modules && !modules_ok || at_host && !host_ok, "{e}");
                prop_assert_eq!(&e.pod, "ns/p");
            }
        }
    }
}

/// A pod without the modules annotation runs as WASI commands, whatever else it says.
#[test]
fn no_modules_annotation_is_wasi() {
    let ann = BTreeMap::from([(DEFAULT_HOST_ANNOTATION.to_string(), "0.0.0.0:1".to_string())]);
    let p =
        plan::plan(&valid_pod(1, &ann), &PlanContext::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(p.kind, PlanKind::Wasi { .. }));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains(DEFAULT_HOST_ANNOTATION))
    );
}
