//! Manifest shapes and media types, and the choice of the wasm layer.
//!
//! Parsed with our own small serde types (not oci-client's) so that any
//! manifest — OCI or Docker, image or index, wasm or not — can be described in
//! an error that says what was found.

use serde::{Deserialize, Serialize};

/// CNCF wasm artifact config (TAG Runtime "Wasm OCI Artifact layout").
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// CNCF wasm artifact layer.
pub const WASM_LAYER: &str = "application/wasm";
/// wasm-to-oci (Krustlet era) config.
pub const WASM_CONFIG_V1: &str = "application/vnd.wasm.config.v1+json";
/// wasm-to-oci (Krustlet era) layer.
pub const WASM_LAYER_V1: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// runwasi's layer (containerd-shim-wasm `supported_layers_types()`, `oci-tar-builder`): one
/// module or component, in an image whose config is an ordinary OCI image config.
pub const WASM_LAYER_RUNWASI: &str =
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
/// The layer media types pull takes as the module or component.
pub const WASM_LAYERS: &[&str] = &[WASM_LAYER, WASM_LAYER_V1, WASM_LAYER_RUNWASI];

/// Whether a layer of this media type is the wasm binary.
pub fn is_wasm_layer(media_type: &str) -> bool {
    WASM_LAYERS.contains(&media_type)
}
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The manifest media types we ask registries for.
pub const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// A content descriptor.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
}

/// An index entry's platform.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

/// Any manifest: image (config + layers) or index (manifests).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: i64,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

/// What a manifest resolves to.
#[derive(Debug)]
pub enum Selection {
    /// An image manifest with a wasm layer.
    Wasm(Descriptor),
    /// An index entry to follow (a wasm platform or wasm artifact type).
    Child(Descriptor),
    /// Not a wasm artifact; the text says what was found.
    NotWasm(String),
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
        if m.schema_version != 2 {
            return Err(format!(
                "schemaVersion {} (only schema 2 manifests are supported)",
                m.schema_version
            ));
        }
        Ok(m)
    }

    pub fn is_index(&self) -> bool {
        self.manifests.is_some()
            || matches!(
                self.media_type.as_deref(),
                Some(OCI_INDEX) | Some(DOCKER_LIST)
            )
    }

    /// Every digest this manifest points at (config, layers, index entries).
    pub fn children(&self) -> Vec<String> {
        let mut v: Vec<String> = self.config.iter().map(|d| d.digest.clone()).collect();
        v.extend(self.layers.iter().flatten().map(|d| d.digest.clone()));
        v.extend(self.manifests.iter().flatten().map(|d| d.digest.clone()));
        v
    }

    /// Pick the wasm layer (or the index entry to follow), or say what this is instead.
    pub fn select(&self) -> Selection {
        if self.is_index() {
            let entries = self.manifests.as_deref().unwrap_or_default();
            if let Some(e) = entries.iter().find(|e| is_wasm_entry(e)) {
                return Selection::Child(e.clone());
            }
            let kind = if self.media_type.as_deref() == Some(DOCKER_LIST) {
                "a Docker manifest list"
            } else {
                "an image index"
            };
            let what: Vec<String> = entries
                .iter()
                .map(|e| match &e.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => e
                        .artifact_type
                        .clone()
                        .unwrap_or_else(|| e.media_type.clone()),
                })
                .collect();
            return Selection::NotWasm(if what.is_empty() {
                format!("{kind} with no entries")
            } else {
                format!("{kind} with no wasm entry (entries: {})", what.join(", "))
            });
        }
        let config_type = self.config.as_ref().map(|c| c.media_type.as_str());
        let layers = self.layers.as_deref().unwrap_or_default();
        let wasm_layers: Vec<&Descriptor> = layers
            .iter()
            .filter(|l| is_wasm_layer(&l.media_type))
            .collect();
        let wasm_config = matches!(config_type, Some(WASM_CONFIG_V0) | Some(WASM_CONFIG_V1));
        match wasm_layers.as_slice() {
            [one] => Selection::Wasm((*one).clone()),
            [] => {
                let layer_types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
                let kind = match config_type {
                    Some("application/vnd.docker.container.image.v1+json") => {
                        "a Docker container image"
                    }
                    Some("application/vnd.oci.image.config.v1+json") => "an OCI container image",
                    _ if wasm_config => "a wasm config but no wasm layer",
                    _ => "a manifest without a wasm layer",
                };
                Selection::NotWasm(format!(
                    "{kind} (config {}, layers [{}]); expected config {WASM_CONFIG_V0} with a {WASM_LAYER} layer, the wasm-to-oci {WASM_CONFIG_V1} with a {WASM_LAYER_V1} layer, or runwasi's {WASM_LAYER_RUNWASI} layer",
                    config_type.unwrap_or("none"),
                    layer_types.join(", ")
                ))
            }
            many => Selection::NotWasm(format!(
                "{} wasm layers; a module image must have exactly one (components with several layers are not supported)",
                many.len()
            )),
        }
    }
}

fn is_wasm_entry(e: &Descriptor) -> bool {
    let p_wasm = e.platform.as_ref().is_some_and(|p| {
        p.architecture == "wasm" || p.os == "wasi" || p.os == "wasip1" || p.os == "wasip2"
    });
    let a_wasm = e
        .artifact_type
        .as_deref()
        .is_some_and(|a| a == WASM_CONFIG_V0 || a == WASM_CONFIG_V1 || a.contains("wasm"));
    p_wasm || a_wasm
}

/// The config blob of the CNCF wasm artifact (`application/vnd.wasm.config.v0+json`).
///
/// As the TAG Runtime "Wasm OCI Artifact layout" defines it
/// (tag-runtime.cncf.io/wgs/wasm/deliverables/wasm-oci-artifact; source
/// github.com/cncf/tag-runtime, website/content/ja/wgs/wasm/deliverables/wasm-oci-artifact/index.md)
/// and `oci-wasm`'s `WasmConfig` writes it (github.com/bytecodealliance/rust-oci-wasm
/// src/config.rs, the crate behind `wkg oci push`; camelCase field names):
/// - `created`: RFC 3339 time;
/// - `author`: optional ("can be set here or as an annotation"), not written;
/// - `architecture`: always `wasm`;
/// - `os`: `wasip1` or `wasip2`; "for plain wasm, this should be wasip1 as this must match a
///   GOOS value"; `oci-wasm` writes `wasip1` for a module (`MODULE_OS`) and `wasip2` for
///   every component (`COMPONENT_OS`); the spec has no other value, so a WASI 0.3 component
///   is `wasip2` too;
/// - `layerDigests`: the layers' digests in manifest order (so that the config, and so the
///   image ID, is unique per content: opencontainers/image-spec#1173);
/// - `component`: "MUST be present when it is a component (wasip2)": `exports`, `imports`,
///   optional `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    pub created: String,
    pub architecture: String,
    pub os: String,
    pub layer_digests: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<crate::wasm::ComponentInfo>,
}

/// The `created` time push writes: the Unix epoch, as reproducible image builders do
/// (ko, rules_oci, Nix's dockerTools), so that pushing the same bytes gives the same
/// manifest digest (and a push to `name@sha256:...` can be checked before it is sent).
pub const CREATED: &str = "1970-01-01T00:00:00Z";

impl WasmConfig {
    /// The config for one layer of this kind. A module, and bytes that are neither module
    /// nor readable component, are `wasip1` with no `component` (what push wrote before).
    pub fn new(kind: &crate::wasm::WasmKind, layer_digest: &str) -> WasmConfig {
        use crate::wasm::WasmKind;
        let (os, component) = match kind {
            WasmKind::Component(c) => ("wasip2", Some(c.clone())),
            WasmKind::Module | WasmKind::Unknown(_) => ("wasip1", None),
        };
        WasmConfig {
            created: CREATED.into(),
            architecture: "wasm".into(),
            os: os.into(),
            layer_digests: vec![layer_digest.to_string()],
            component,
        }
    }
}

/// The CNCF-layout manifest and config for one module or component, as bytes (what push
/// uploads): config [`WASM_CONFIG_V0`] ([`WasmConfig`]), one [`WASM_LAYER`] layer.
pub fn cncf_artifact(
    kind: &crate::wasm::WasmKind,
    layer_digest: &str,
    layer_size: u64,
) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(&WasmConfig::new(kind, layer_digest)).unwrap_or_default();
    let config_digest = crate::store::sha256_digest(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": WASM_CONFIG_V0, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": WASM_LAYER, "digest": layer_digest, "size": layer_size}],
    });
    (serde_json::to_vec(&manifest).unwrap_or_default(), config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::{ComponentInfo, WasmKind};

    #[test]
    fn selects_cncf_and_v1_layers() {
        let (m, _) = cncf_artifact(&WasmKind::Module, "sha256:ab", 3);
        match Manifest::parse(&m).unwrap().select() {
            Selection::Wasm(d) => assert_eq!((d.digest.as_str(), d.size), ("sha256:ab", 3)),
            other => panic!("{other:?}"),
        }
        let v1 = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.wasm.config.v1+json","digest":"sha256:c","size":2},
            "layers":[{"mediaType":"application/vnd.wasm.content.layer.v1+wasm","digest":"sha256:l","size":9}]}"#;
        assert!(
            matches!(Manifest::parse(v1).unwrap().select(), Selection::Wasm(d) if d.digest == "sha256:l")
        );
    }

    fn image(config: &str, layers: &[&str]) -> Vec<u8> {
        let layers: Vec<String> = layers
            .iter()
            .enumerate()
            .map(|(i, m)| format!(r#"{{"mediaType":"{m}","digest":"sha256:l{i}","size":9}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{config}","digest":"sha256:c","size":2}},"layers":[{}]}}"#,
            layers.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn selects_runwasi_component_layer_beside_other_layers() {
        // runwasi (oci-tar-builder): an ordinary OCI image config, the component layer, and
        // maybe layers of other kinds (runtime configuration) that are not the binary
        let runwasi = image(
            "application/vnd.oci.image.config.v1+json",
            &["application/vnd.oci.image.layer.v1.tar", WASM_LAYER_RUNWASI],
        );
        match Manifest::parse(&runwasi).unwrap().select() {
            Selection::Wasm(d) => {
                assert_eq!(d.digest, "sha256:l1");
                assert_eq!(d.media_type, WASM_LAYER_RUNWASI);
            }
            other => panic!("{other:?}"),
        }
        for layer in [WASM_LAYER, WASM_LAYER_V1, WASM_LAYER_RUNWASI] {
            let m = image(WASM_CONFIG_V0, &[layer]);
            assert!(
                matches!(Manifest::parse(&m).unwrap().select(), Selection::Wasm(d) if d.media_type == layer),
                "{layer}"
            );
        }
        // two binaries, whatever their types: refused, as before
        let two = image(WASM_CONFIG_V0, &[WASM_LAYER, WASM_LAYER_RUNWASI]);
        assert!(matches!(
            Manifest::parse(&two).unwrap().select(),
            Selection::NotWasm(s) if s.contains("2 wasm layers")
        ));
        // a near miss is not a wasm layer, and the refusal names runwasi's type as accepted
        let near = image(
            "application/vnd.oci.image.config.v1+json",
            &["application/vnd.bytecodealliance.wasm.component.layer.v1+wasm"],
        );
        match Manifest::parse(&near).unwrap().select() {
            Selection::NotWasm(s) => assert!(s.contains(WASM_LAYER_RUNWASI), "{s}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn config_of_a_component_and_of_a_module() {
        let info = ComponentInfo {
            exports: vec!["wasi:http/incoming-handler@0.2.6".into()],
            imports: vec!["wasi:cli/environment@0.2.0".into(), "log".into()],
            target: None,
        };
        let (m, c) = cncf_artifact(&WasmKind::Component(info), "sha256:ab", 3);
        let c: serde_json::Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(
            c,
            serde_json::json!({
                "created": "1970-01-01T00:00:00Z",
                "architecture": "wasm",
                "os": "wasip2",
                "layerDigests": ["sha256:ab"],
                "component": {
                    "exports": ["wasi:http/incoming-handler@0.2.6"],
                    "imports": ["wasi:cli/environment@0.2.0", "log"],
                },
            })
        );
        let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(m["config"]["mediaType"], WASM_CONFIG_V0);
        assert_eq!(m["layers"][0]["mediaType"], WASM_LAYER);
        assert_eq!(m["layers"].as_array().map(Vec::len), Some(1));

        for kind in [WasmKind::Module, WasmKind::Unknown("odd".into())] {
            let (_, c) = cncf_artifact(&kind, "sha256:ab", 3);
            let c: serde_json::Value = serde_json::from_slice(&c).unwrap();
            assert_eq!(
                c,
                serde_json::json!({
                    "created": "1970-01-01T00:00:00Z",
                    "architecture": "wasm",
                    "os": "wasip1",
                    "layerDigests": ["sha256:ab"],
                }),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn refuses_docker_image_and_index_saying_what_it_is() {
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:c","size":2},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:l","size":9}]}"#;
        match Manifest::parse(docker).unwrap().select() {
            Selection::NotWasm(s) => {
                assert!(s.contains("Docker container image"), "{s}");
                assert!(s.contains("rootfs.diff.tar.gzip"), "{s}");
            }
            other => panic!("{other:?}"),
        }
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:b","size":1,"platform":{"os":"linux","architecture":"arm64"}}]}"#;
        match Manifest::parse(index).unwrap().select() {
            Selection::NotWasm(s) => assert!(s.contains("linux/amd64, linux/arm64"), "{s}"),
            other => panic!("{other:?}"),
        }
        let wasm_index = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:w","size":1,"platform":{"os":"wasip1","architecture":"wasm"}}]}"#;
        assert!(
            matches!(Manifest::parse(wasm_index).unwrap().select(), Selection::Child(d) if d.digest == "sha256:w")
        );
        assert!(Manifest::parse(br#"{"schemaVersion":1}"#).is_err());
    }
}
