//! Property tests for what the OCI layer reads from pod authors and registries: image
//! references ([`ImageRef::parse`]), manifests ([`Manifest::parse`] and
//! [`Manifest::select`]), and the digests a manifest names, which become file names in the
//! store ([`store::digest_hex`], [`Store::blob_path`]).

use std::path::Component;

use oci::manifest::{self, Manifest, Selection};
use oci::store::{self, Store};
use oci::{ImageRef, RefError};
use proptest::prelude::*;
use serde_json::{Value, json};

const HEX64: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Small JSON values of any shape.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn media_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(manifest::WASM_LAYER.to_string()),
        Just(manifest::WASM_LAYER_V1.to_string()),
        Just(manifest::WASM_LAYER_RUNWASI.to_string()),
        Just(manifest::WASM_CONFIG_V0.to_string()),
        Just(manifest::WASM_CONFIG_V1.to_string()),
        Just(manifest::OCI_MANIFEST.to_string()),
        Just(manifest::OCI_INDEX.to_string()),
        Just(manifest::DOCKER_MANIFEST.to_string()),
        Just(manifest::DOCKER_LIST.to_string()),
        Just("application/vnd.oci.image.config.v1+json".to_string()),
        Just("application/vnd.docker.container.image.v1+json".to_string()),
        Just("application/vnd.oci.image.layer.v1.tar+gzip".to_string()),
        Just("APPLICATION/WASM".to_string()),
        Just(String::new()),
        "\\PC{0,12}",
    ]
}

fn digest() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(format!("sha256:{HEX64}")),
        "sha256:[0-9a-f]{64}",
        "sha256:[0-9a-fA-F]{63,65}",
        "sha(256|512):[0-9a-z./]{0,70}",
        Just("sha256:../../../../etc/passwd".to_string()),
        Just(format!("sha256:{HEX64}/../x")),
        Just(format!("sha256:{HEX64}\n")),
        "\\PC{0,12}",
    ]
}

/// A JSON value for a field that should be `T`: usually one, sometimes anything.
fn or_anything(good: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop_oneof![30 => good, 1 => any_json()]
}

/// A descriptor as registries write them, each field sometimes missing or of another type.
fn descriptor() -> impl Strategy<Value = Value> {
    (
        prop::option::weighted(0.9, or_anything(media_type().prop_map(Value::from))),
        prop::option::weighted(0.95, or_anything(digest().prop_map(Value::from))),
        prop::option::weighted(0.9, or_anything(any::<u64>().prop_map(Value::from))),
        prop::option::of(or_anything(
            (
                prop_oneof![Just("wasm"), Just("amd64"), Just("arm64"), Just("")],
                prop_oneof![
                    Just("wasip1"),
                    Just("wasip2"),
                    Just("wasi"),
                    Just("linux"),
                    Just("")
                ],
            )
                .prop_map(|(a, o)| json!({"architecture": a, "os": o})),
        )),
        prop::option::of(or_anything(media_type().prop_map(Value::from))),
    )
        .prop_map(|(media, digest, size, platform, artifact)| {
            let mut d = serde_json::Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    d.insert(k.to_string(), v);
                }
            };
            put("mediaType", media);
            put("digest", digest);
            put("size", size);
            put("platform", platform);
            put("artifactType", artifact);
            Value::Object(d)
        })
}

/// A manifest as a registry may send it: image or index, each part sometimes missing,
/// mistyped, or another shape altogether.
fn manifest_json() -> impl Strategy<Value = Value> {
    (
        prop::option::weighted(
            0.95,
            or_anything(prop_oneof![9 => Just(json!(2)), 1 => any::<i64>().prop_map(Value::from)]),
        ),
        prop::option::of(or_anything(media_type().prop_map(Value::from))),
        prop::option::of(or_anything(media_type().prop_map(Value::from))),
        prop::option::of(or_anything(descriptor())),
        prop::option::of(or_anything(
            prop::collection::vec(descriptor(), 0..4).prop_map(Value::Array),
        )),
        prop::option::weighted(
            0.3,
            or_anything(prop::collection::vec(descriptor(), 0..4).prop_map(Value::Array)),
        ),
        prop::collection::btree_map("[a-z]{1,6}", any_json(), 0..2),
    )
        .prop_map(
            |(schema, media, artifact, config, layers, manifests, extra)| {
                let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                };
                put("schemaVersion", schema);
                put("mediaType", media);
                put("artifactType", artifact);
                put("config", config);
                put("layers", layers);
                put("manifests", manifests);
                Value::Object(m)
            },
        )
}

fn is_wasm_layer(d: &manifest::Descriptor) -> bool {
    d.media_type == manifest::WASM_LAYER
        || d.media_type == manifest::WASM_LAYER_V1
        || d.media_type == manifest::WASM_LAYER_RUNWASI
}

fn is_wasm_entry(d: &manifest::Descriptor) -> bool {
    d.platform.as_ref().is_some_and(|p| {
        p.architecture == "wasm" || ["wasi", "wasip1", "wasip2"].contains(&p.os.as_str())
    }) || d
        .artifact_type
        .as_deref()
        .is_some_and(|a| a.contains("wasm"))
}

/// What a selection says about a parsed manifest holds.
fn check_selection(m: &Manifest) -> Result<(), TestCaseError> {
    let layers = m.layers.clone().unwrap_or_default();
    let entries = m.manifests.clone().unwrap_or_default();
    match m.select() {
        Selection::Wasm(d) => {
            prop_assert!(!m.is_index());
            let wasm: Vec<_> = layers.iter().filter(|l| is_wasm_layer(l)).collect();
            prop_assert_eq!(wasm, vec![&d]);
        }
        Selection::Child(d) => {
            prop_assert!(m.is_index());
            prop_assert_eq!(entries.iter().find(|e| is_wasm_entry(e)), Some(&d));
        }
        Selection::NotWasm(text) => {
            if m.is_index() {
                prop_assert!(!entries.iter().any(is_wasm_entry), "{text}");
                for e in &entries {
                    let what = match &e.platform {
                        Some(p) => format!("{}/{}", p.os, p.architecture),
                        None => e
                            .artifact_type
                            .clone()
                            .unwrap_or_else(|| e.media_type.clone()),
                    };
                    prop_assert!(text.contains(&what), "{text:?} does not say {what:?}");
                }
            } else {
                let wasm = layers.iter().filter(|l| is_wasm_layer(l)).count();
                prop_assert!(wasm != 1, "{text}");
                if wasm == 0 {
                    // It says what it found: the config's and every layer's media type.
                    let config = m.config.as_ref().map_or("none", |c| c.media_type.as_str());
                    prop_assert!(text.contains(config), "{text:?} does not say {config:?}");
                    for l in &layers {
                        prop_assert!(
                            text.contains(&l.media_type),
                            "{text:?} does not say {:?}",
                            l.media_type
                        );
                    }
                } else {
                    prop_assert!(text.contains(&wasm.to_string()), "{text}");
                }
            }
        }
    }
    let mut children: Vec<String> = m.config.iter().map(|d| d.digest.clone()).collect();
    children.extend(layers.iter().map(|d| d.digest.clone()));
    children.extend(entries.iter().map(|d| d.digest.clone()));
    prop_assert_eq!(m.children(), children);
    Ok(())
}

/// Reference-like text: registries, repositories, tags, digests and the characters that
/// separate them.
fn reference_ish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("docker.io/".to_string()),
        Just("index.docker.io/".to_string()),
        Just("ghcr.io/".to_string()),
        Just("localhost/".to_string()),
        Just("localhost:5000/".to_string()),
        Just("127.0.0.1:5000/".to_string()),
        Just("[::1]:5000/".to_string()),
        Just("r.io:abc/".to_string()),
        Just("library/".to_string()),
        Just("hello".to_string()),
        Just("m.wasm".to_string()),
        Just("a-b_c.d".to_string()),
        Just("Up".to_string()),
        Just("/".to_string()),
        Just(":".to_string()),
        Just(":v1".to_string()),
        Just(":latest".to_string()),
        Just(format!("@sha256:{HEX64}")),
        Just("@sha256:abc".to_string()),
        Just("@md5:abc".to_string()),
        Just("@".to_string()),
        Just("..".to_string()),
        Just("./".to_string()),
        Just("file://".to_string()),
        Just("https://".to_string()),
        Just(" ".to_string()),
        "[a-z0-9]{1,4}",
        "\\PC{0,3}",
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

/// A registry reference as people write them (valid by construction).
fn valid_reference() -> impl Strategy<Value = String> {
    (
        prop::option::of(prop_oneof![
            Just("docker.io"),
            Just("index.docker.io"),
            Just("ghcr.io"),
            Just("localhost"),
            Just("localhost:5000"),
            Just("127.0.0.1:5000"),
            Just("registry.example.com:443"),
        ]),
        prop::collection::vec("[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?", 1..4),
        prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
        prop::option::of("[0-9a-f]{64}"),
    )
        .prop_map(|(registry, path, tag, digest)| {
            let mut s = registry.map(|r| format!("{r}/")).unwrap_or_default();
            s.push_str(&path.join("/"));
            if let Some(t) = tag {
                s.push(':');
                s.push_str(&t);
            }
            if let Some(d) = digest {
                s.push_str("@sha256:");
                s.push_str(&d);
            }
            s
        })
}

fn check_reference(s: &str) -> Result<(), TestCaseError> {
    match ImageRef::parse(s) {
        Ok(ImageRef::Registry(r)) => {
            prop_assert!(
                !s.contains("://") && !s.chars().any(char::is_whitespace),
                "{s:?}"
            );
            let shown = r.to_string();
            let again = ImageRef::parse(&shown)
                .map_err(|e| TestCaseError::fail(format!("{s:?} shows as {shown:?}: {e}")))?;
            prop_assert_eq!(
                again.as_registry(),
                Some(&r),
                "{:?} shows as {:?}",
                s,
                shown
            );
            prop_assert_eq!(again.to_string(), shown);
        }
        Ok(ImageRef::Local(p)) => {
            let local = s.starts_with("file://")
                || s.starts_with('/')
                || s.starts_with("./")
                || s.starts_with("../")
                || ((s.ends_with(".wasm") || s.ends_with(".wat")) && !s.contains([':', '@']));
            prop_assert!(local, "{s:?} read as the local file {p:?}");
        }
        Err(RefError::Empty) => prop_assert!(s.trim().is_empty()),
        Err(
            RefError::FileNotAbsolute { input }
            | RefError::Scheme { input }
            | RefError::Invalid { input, .. },
        ) => prop_assert_eq!(input, s),
        Err(e @ RefError::Policy { .. }) => {
            return Err(TestCaseError::fail(format!("{s:?}: {e}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn manifest_parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Manifest::parse(&bytes) {
            prop_assert_eq!(m.schema_version, 2);
            check_selection(&m)?;
        }
    }

    /// Whatever a registry sends, the manifest is read or refused; what is read is schema 2,
    /// and its selection is the one wasm layer (or the first wasm index entry), or says what
    /// was found instead.
    #[test]
    fn manifests_select_what_they_hold(v in manifest_json()) {
        let bytes = serde_json::to_vec(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(m) = Manifest::parse(&bytes) {
            prop_assert_eq!(v.get("schemaVersion"), Some(&json!(2)));
            prop_assert_eq!(m.schema_version, 2);
            check_selection(&m)?;
        }
    }

    /// The manifest push writes, with its layer's media type, size and digest changed as a
    /// registry (or an attacker in its place) may: the layer is chosen exactly when its media
    /// type is a wasm layer's, with the size and digest as written; a digest that is not
    /// `sha256:<64 lowercase hex>` is never a file name in the store.
    #[test]
    fn mutated_manifests_keep_what_they_say(
        media in media_type(),
        size in or_anything(any::<u64>().prop_map(Value::from)),
        digest in or_anything(digest().prop_map(Value::from)),
        config_media in media_type(),
    ) {
        let (bytes, _) = manifest::cncf_artifact(&oci::wasm::WasmKind::Module, &format!("sha256:{HEX64}"), 1);
        let mut v: Value = serde_json::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        v["layers"][0]["mediaType"] = json!(media);
        v["layers"][0]["size"] = size.clone();
        v["layers"][0]["digest"] = digest.clone();
        v["config"]["mediaType"] = json!(config_media);
        let bytes = serde_json::to_vec(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let parsed = Manifest::parse(&bytes);
        let (Some(size), Some(digest)) = (size.as_u64(), digest.as_str()) else {
            prop_assert!(parsed.is_err(), "size {size} digest {digest} read as {parsed:?}");
            return Ok(());
        };
        let m = parsed.map_err(|e| TestCaseError::fail(format!("{v}: {e}")))?;
        check_selection(&m)?;
        let wasm = media == manifest::WASM_LAYER
            || media == manifest::WASM_LAYER_V1
            || media == manifest::WASM_LAYER_RUNWASI;
        match m.select() {
            Selection::Wasm(d) => {
                prop_assert!(wasm);
                prop_assert_eq!((d.digest.as_str(), d.size), (digest, size));
                let well_formed = digest.strip_prefix("sha256:").is_some_and(|h| {
                    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                });
                prop_assert_eq!(store::digest_hex(&d.digest).is_some(), well_formed, "{:?}", digest);
            }
            other => prop_assert!(!wasm, "{other:?}"),
        }
    }

    /// A digest from outside names a file directly in `blobs/sha256` of the store, or the one
    /// placeholder that never exists; never a path elsewhere.
    #[test]
    fn digests_never_name_a_path_outside_the_store(d in prop_oneof![digest(), "[ -~]{0,80}"]) {
        let tmp = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let store = Store::open(tmp.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let p = store.blob_path(&d);
        let rel = p.strip_prefix(store.root().join("blobs/sha256"))
            .map_err(|_| TestCaseError::fail(format!("{d:?} -> {}", p.display())))?;
        let parts: Vec<Component> = rel.components().collect();
        prop_assert!(matches!(parts.as_slice(), [Component::Normal(_)]), "{:?} -> {}", d, p.display());
        match store::digest_hex(&d) {
            Some(h) => {
                prop_assert_eq!(format!("sha256:{h}"), d.clone());
                prop_assert!(h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            }
            None => prop_assert!(p.ends_with("invalid-digest")),
        }
    }

    #[test]
    fn image_ref_parse_never_panics(s in "\\PC{0,40}") {
        check_reference(&s)?;
    }

    /// Reference-like text is read as a local file only in the local forms, refused with an
    /// error that names it, or read as a registry reference that shows as text which reads
    /// back as the same reference.
    #[test]
    fn registry_references_show_as_what_they_are(s in prop_oneof![reference_ish(), valid_reference()]) {
        check_reference(&s)?;
    }

    /// Well-formed references are registry references.
    #[test]
    fn valid_references_parse(s in valid_reference()) {
        let r = ImageRef::parse(&s).map_err(|e| TestCaseError::fail(format!("{s:?}: {e}")))?;
        prop_assert!(r.as_registry().is_some(), "{s:?}: {r:?}");
    }
}

/// `sha256_digest` is always a well-formed digest.
#[test]
fn sha256_digest_is_well_formed() {
    let d = store::sha256_digest(b"");
    assert_eq!(store::digest_hex(&d), Some(HEX64));
}
