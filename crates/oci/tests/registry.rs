//! Pull/push against a real distribution registry on loopback.

mod support;

use std::collections::HashSet;

use oci::manifest::{
    DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, WASM_CONFIG_V0, WASM_CONFIG_V1, WASM_LAYER,
    WASM_LAYER_RUNWASI, WASM_LAYER_V1,
};
use oci::store::sha256_digest;
use oci::{Client, Credentials, NoProgress, OciError, PullPolicy, Store};
use support::{Registry, RegistryExt, wasm_file};

struct Node {
    _dir: tempfile::TempDir,
    client: Client,
}

fn node(creds: Credentials) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    Node {
        client: Client::new(store, creds, vec![]),
        _dir: dir,
    }
}

fn creds_for(reg: &Registry) -> Credentials {
    let mut c = Credentials::default();
    if let Some((u, p)) = &reg.basic {
        c.insert_basic(&reg.addr, u, p);
    }
    c
}

async fn push(reg: &Registry, repo_tag: &str, tag: &str) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (file, bytes) = wasm_file(dir.path(), tag);
    let pusher = node(creds_for(reg));
    let d = pusher
        .client
        .push(&file, &reg.reference(repo_tag), &NoProgress)
        .await
        .expect("push");
    (d, bytes)
}

#[tokio::test]
async fn push_then_pull_by_tag_and_by_digest() {
    let reg = Registry::start();
    let (manifest_digest, bytes) = push(&reg, "hello/wagi:v1", "hello").await;
    assert!(manifest_digest.starts_with("sha256:"));
    // pushing the same bytes again gives the same digest
    assert_eq!(
        push(&reg, "hello/wagi:v1", "hello").await.0,
        manifest_digest
    );

    let n = node(Credentials::default());
    let r = reg.reference("hello/wagi:v1");
    let p = n
        .client
        .pull(&r, PullPolicy::IfNotPresent, None)
        .await
        .expect("pull by tag");
    assert_eq!(p.layer_digest, sha256_digest(&bytes));
    assert_eq!(p.manifest_digest, manifest_digest);
    assert_eq!(p.size, bytes.len() as u64);
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);
    assert_eq!(p.path, n.client.store().blob_path(&p.layer_digest));

    let n2 = node(Credentials::default());
    let by_digest = reg.reference(&format!("hello/wagi@{manifest_digest}"));
    assert_eq!(
        PullPolicy::default_for(&by_digest),
        PullPolicy::IfNotPresent
    );
    let p2 = n2
        .client
        .pull(&by_digest, PullPolicy::Always, None)
        .await
        .expect("pull by digest");
    assert_eq!(p2.layer_digest, p.layer_digest);
    assert_eq!(std::fs::read(&p2.path).unwrap(), bytes);
}

#[tokio::test]
async fn push_wat_and_refuse_non_wasm_file() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let wat = dir.path().join("m.wat");
    std::fs::write(&wat, r#"(module (func (export "_start")))"#).unwrap();
    let n = node(Credentials::default());
    let r = reg.reference("m:1");
    n.client
        .push(&wat, &r, &NoProgress)
        .await
        .expect("push .wat");
    let p = n.client.pull(&r, PullPolicy::Always, None).await.unwrap();
    assert!(std::fs::read(&p.path).unwrap().starts_with(b"\0asm"));

    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    let e = n.client.push(&txt, &r, &NoProgress).await.unwrap_err();
    assert!(matches!(e, OciError::BadFile { .. }), "{e}");
    assert!(e.to_string().contains("notes.txt"), "{e}");
}

#[tokio::test]
async fn wasm_to_oci_v1_layout_is_pulled() {
    let reg = Registry::start();
    let bytes = support::wasm("krustlet");
    let layer = reg.raw_blob("krustlet/hello", &bytes);
    let config = br#"{}"#;
    let config_d = reg.raw_blob("krustlet/hello", config);
    // what wasm-to-oci wrote for Krustlet's images
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"{WASM_CONFIG_V1}","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"{WASM_LAYER_V1}","digest":"{layer}","size":{},"annotations":{{"org.opencontainers.image.title":"module.wasm"}}}}]}}"#,
        config.len(),
        bytes.len()
    );
    reg.raw_manifest(
        "krustlet/hello",
        "v1.0.0",
        OCI_MANIFEST,
        manifest.as_bytes(),
    );
    let n = node(Credentials::default());
    let p = n
        .client
        .pull(
            &reg.reference("krustlet/hello:v1.0.0"),
            PullPolicy::IfNotPresent,
            None,
        )
        .await
        .expect("pull wasm-to-oci");
    assert_eq!(p.layer_digest, layer);
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);
}

/// What a user pushing a component finds in the registry (read over the distribution API, as
/// `crane manifest` / `wkg` would): the CNCF wasm config type, one `application/wasm` layer, and
/// a config naming the component's imports and exports (TAG Runtime wasm OCI artifact spec).
#[tokio::test]
async fn pushed_component_config_describes_its_interfaces() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("handler.wat");
    std::fs::write(
        &file,
        r#"(component
            (import "wasi:cli/environment@0.2.0" (instance))
            (import "wasi:http/types@0.2.6" (instance))
            (core module (func (export "handle")))
            (instance $h)
            (export "wasi:http/incoming-handler@0.2.6" (instance $h)))"#,
    )
    .unwrap();
    let n = node(Credentials::default());
    let digest = n
        .client
        .push(&file, &reg.reference("components/handler:v1"), &NoProgress)
        .await
        .expect("push component");
    let http = reqwest::Client::new();
    let manifest: serde_json::Value = http
        .get(format!(
            "http://{}/v2/components/handler/manifests/v1",
            reg.addr
        ))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        manifest["config"]["mediaType"], WASM_CONFIG_V0,
        "{manifest}"
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], WASM_LAYER, "{manifest}");
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value = http
        .get(format!(
            "http://{}/v2/components/handler/blobs/{config_digest}",
            reg.addr
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["architecture"], "wasm", "{config}");
    assert_eq!(config["os"], "wasip2", "{config}");
    assert_eq!(config["layerDigests"][0], layers[0]["digest"], "{config}");
    assert!(config["created"].is_string(), "{config}");
    assert_eq!(
        config["component"]["exports"],
        serde_json::json!(["wasi:http/incoming-handler@0.2.6"]),
        "{config}"
    );
    assert_eq!(
        config["component"]["imports"],
        serde_json::json!(["wasi:cli/environment@0.2.0", "wasi:http/types@0.2.6"]),
        "{config}"
    );
    // and it pulls back as the same bytes
    let p = n
        .client
        .pull(
            &reg.reference("components/handler:v1"),
            PullPolicy::Always,
            None,
        )
        .await
        .expect("pull component");
    assert_eq!(p.manifest_digest, digest);
    assert!(
        std::fs::read(&p.path)
            .unwrap()
            .starts_with(b"\0asm\x0d\0\x01\0")
    );
}

/// An image as runwasi's `oci-tar-builder` writes it (an OCI image config, the component in a
/// `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm` layer) is pulled.
#[tokio::test]
async fn runwasi_component_layer_is_pulled() {
    let reg = Registry::start();
    let bytes = wat::parse_str(r#"(component (import "wasi:cli/run@0.2.0" (instance)))"#).unwrap();
    let layer = reg.raw_blob("runwasi/hello", &bytes);
    let config =
        br#"{"architecture":"wasm","os":"wasip2","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_d = reg.raw_blob("runwasi/hello", config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"{WASM_LAYER_RUNWASI}","digest":"{layer}","size":{}}}]}}"#,
        config.len(),
        bytes.len()
    );
    reg.raw_manifest("runwasi/hello", "latest", OCI_MANIFEST, manifest.as_bytes());
    let n = node(Credentials::default());
    let p = n
        .client
        .pull(
            &reg.reference("runwasi/hello:latest"),
            PullPolicy::IfNotPresent,
            None,
        )
        .await
        .expect("pull runwasi image");
    assert_eq!(p.layer_digest, layer);
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);
}

#[tokio::test]
async fn docker_image_and_foreign_index_refused_saying_what_was_found() {
    let reg = Registry::start();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_d = reg.raw_blob("library/busybox", config);
    let tar = vec![0u8; 1024];
    let tar_d = reg.raw_blob("library/busybox", &tar);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{tar_d}","size":1024}}]}}"#,
        config.len()
    );
    let md = reg.raw_manifest(
        "library/busybox",
        "1.36",
        DOCKER_MANIFEST,
        manifest.as_bytes(),
    );
    let n = node(Credentials::default());
    let r = reg.reference("library/busybox:1.36");
    let e = n
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, OciError::NotWasm { .. }), "{msg}");
    assert!(msg.contains(&r.to_string()), "{msg}");
    assert!(msg.contains("Docker container image"), "{msg}");
    assert!(
        msg.contains("application/vnd.docker.container.image.v1+json"),
        "{msg}"
    );
    assert_eq!(
        reg.blob_gets(&tar_d),
        0,
        "nothing downloaded for a non-wasm image"
    );

    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{md}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
        manifest.len()
    );
    reg.raw_manifest("library/busybox", "multi", OCI_INDEX, index.as_bytes());
    let e = n
        .client
        .pull(
            &reg.reference("library/busybox:multi"),
            PullPolicy::Always,
            None,
        )
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, OciError::NotWasm { .. }), "{msg}");
    assert!(
        msg.contains("image index with no wasm entry") && msg.contains("linux/amd64"),
        "{msg}"
    );
}

#[tokio::test]
async fn index_with_a_wasm_entry_is_followed() {
    let reg = Registry::start();
    let (md, bytes) = push(&reg, "multi/m:img", "idx").await;
    let n = node(Credentials::default());
    let img = n
        .client
        .pull(&reg.reference("multi/m:img"), PullPolicy::Always, None)
        .await
        .unwrap();
    let size = std::fs::metadata(n.client.store().blob_path(&md))
        .unwrap()
        .len();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{size},"platform":{{"os":"wasip1","architecture":"wasm"}}}}]}}"#
    );
    reg.raw_manifest("multi/m", "idx", OCI_INDEX, index.as_bytes());
    let n2 = node(Credentials::default());
    let p = n2
        .client
        .pull(
            &reg.reference("multi/m:idx"),
            PullPolicy::IfNotPresent,
            None,
        )
        .await
        .expect("pull via index");
    assert_eq!(p.layer_digest, img.layer_digest);
    assert_eq!(p.manifest_digest, md);
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);
    // and from the store, through the stored index
    let again = n2
        .client
        .pull(&reg.reference("multi/m:idx"), PullPolicy::Never, None)
        .await
        .expect("index resolved from the store");
    assert_eq!(again, p);
}

#[tokio::test]
async fn basic_auth_refused_without_credentials_accepted_with_them() {
    let reg = Registry::start_with_htpasswd("wasi", "s3cret");
    let r = reg.reference("private/m:v1");

    // push without credentials: refused, naming reference and registry
    let dir = tempfile::tempdir().unwrap();
    let (file, bytes) = wasm_file(dir.path(), "private");
    let e = node(Credentials::default())
        .client
        .push(&file, &r, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");
    push(&reg, "private/m:v1", "private").await;

    let anon = node(Credentials::default());
    let e = anon
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, OciError::Unauthorized { .. }), "{msg}");
    assert!(
        msg.contains(&r.to_string()) && msg.contains(&reg.addr),
        "{msg}"
    );

    // wrong password
    let mut wrong = Credentials::default();
    wrong.insert_basic(&reg.addr, "wasi", "nope");
    let e = node(wrong)
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");

    // a Docker config file
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
            reg.addr,
            base64_encode(b"wasi:s3cret")
        ),
    )
    .unwrap();
    let creds = Credentials::from_docker_config_file(&cfg).unwrap();
    let with_config = node(creds);
    let p = with_config
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .expect("pull with config");
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);

    // node mode: the pod's imagePullSecrets (dockerconfigjson), on an anonymous client
    let secret = format!(
        r#"{{"auths":{{"http://{}/v2/":{{"username":"wasi","password":"s3cret"}}}}}}"#,
        reg.addr
    );
    let pod = Credentials::from_dockerconfigjson(secret.as_bytes()).unwrap();
    let p = anon
        .client
        .pull(&r, PullPolicy::Always, Some(&pod))
        .await
        .expect("pull with imagePullSecrets");
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);
}

use e2e::registry::base64 as base64_encode;

#[tokio::test]
async fn registry_gone_module_still_served_from_store() {
    let mut reg = Registry::start();
    let (_, bytes) = push(&reg, "offline/m:v1", "offline").await;
    let n = node(Credentials::default());
    let r = reg.reference("offline/m:v1");
    let policy = PullPolicy::parse(None, &r).unwrap();
    assert_eq!(policy, PullPolicy::IfNotPresent);
    let first = n.client.pull(&r, policy, None).await.expect("first pull");
    reg.stop();

    let again = n
        .client
        .pull(&r, PullPolicy::IfNotPresent, None)
        .await
        .expect("from store");
    assert_eq!(again, first);
    assert_eq!(std::fs::read(&again.path).unwrap(), bytes);
    let never = n
        .client
        .pull(&r, PullPolicy::Never, None)
        .await
        .expect("Never from store");
    assert_eq!(never, first);

    let e = n
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, OciError::Unreachable { .. }), "{msg}");
    assert!(msg.contains(&r.to_string()), "{msg}");
    assert!(e.is_transient());

    // a tag never pulled: Never says so, IfNotPresent needs the registry
    let other = reg.reference("offline/m:v2");
    let e = n
        .client
        .pull(&other, PullPolicy::Never, None)
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::NeverPull { .. }), "{e}");
    assert_eq!(e.kubelet_reason(), "ErrImageNeverPull");
    let e = n
        .client
        .pull(&other, PullPolicy::IfNotPresent, None)
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::Unreachable { .. }), "{e}");
}

#[tokio::test]
async fn missing_reference_is_not_found_by_name() {
    let reg = Registry::start();
    push(&reg, "exists/m:v1", "exists").await;
    let n = node(Credentials::default());
    for missing in ["nothere/m:v1", "exists/m:v2"] {
        let r = reg.reference(missing);
        let e = n
            .client
            .pull(&r, PullPolicy::IfNotPresent, None)
            .await
            .unwrap_err();
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, OciError::NotFound { .. }), "{msg}");
        assert!(msg.contains(&r.to_string()), "{msg}");
        assert!(!e.is_transient());
        assert_eq!(e.kubelet_reason(), "ErrImagePull");
    }
}

#[tokio::test]
async fn concurrent_pulls_of_one_digest_download_once() {
    let reg = Registry::start();
    let (_, bytes) = push(&reg, "shared/m:v1", "shared").await;
    let layer = sha256_digest(&bytes);
    assert_eq!(reg.blob_gets(&layer), 0);
    let n = node(Credentials::default());
    let r = reg.reference("shared/m:v1");
    let other_handle = n.client.clone();
    let (a, b, c) = tokio::join!(
        n.client.pull(&r, PullPolicy::Always, None),
        n.client.pull(&r, PullPolicy::Always, None),
        other_handle.pull(&r, PullPolicy::IfNotPresent, None),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.path, b.path);
    assert_eq!(a.path, c.path);
    // same content under another tag: no download at all
    push(&reg, "shared/m:other", "shared").await;
    n.client
        .pull(&reg.reference("shared/m:other"), PullPolicy::Always, None)
        .await
        .unwrap();
    assert_eq!(reg.blob_gets(&layer), 1, "the layer is downloaded once");
}

#[tokio::test]
async fn corrupt_store_blob_is_detected_and_refetched() {
    let reg = Registry::start();
    let (_, bytes) = push(&reg, "corrupt/m:v1", "corrupt").await;
    let n = node(Credentials::default());
    let r = reg.reference("corrupt/m:v1");
    let p = n
        .client
        .pull(&r, PullPolicy::IfNotPresent, None)
        .await
        .unwrap();
    // corrupt the stored (read-only) blob
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p.path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut evil = bytes.clone();
    let last = evil.len() - 1;
    evil[last] ^= 0xff;
    std::fs::write(&p.path, &evil).unwrap();

    // Never cannot fix it: the blob is verified, found corrupt, and refused
    let e = n
        .client
        .pull(&r, PullPolicy::Never, None)
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::NeverPull { .. }), "{e}");
    // IfNotPresent re-downloads
    let p2 = n
        .client
        .pull(&r, PullPolicy::IfNotPresent, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&p2.path).unwrap(), bytes);
    assert_eq!(reg.blob_gets(&p.layer_digest), 2);
}

#[tokio::test]
async fn gc_removes_unreferenced_and_keeps_referenced() {
    let mut reg = Registry::start();
    let (_, a_bytes) = push(&reg, "gc/a:v1", "gc-a").await;
    push(&reg, "gc/b:v1", "gc-b").await;
    let n = node(Credentials::default());
    let a = n
        .client
        .pull(&reg.reference("gc/a:v1"), PullPolicy::IfNotPresent, None)
        .await
        .unwrap();
    let b = n
        .client
        .pull(&reg.reference("gc/b:v1"), PullPolicy::IfNotPresent, None)
        .await
        .unwrap();
    let before = n.client.store().blobs().unwrap().len();
    assert_eq!(before, 4, "two layers and two manifests");

    let report = n
        .client
        .gc(&HashSet::from([a.layer_digest.clone()]))
        .await
        .unwrap();
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert!(report.removed.contains(&b.layer_digest));
    assert!(report.removed.contains(&b.manifest_digest));
    assert!(!b.path.exists());
    assert!(a.path.exists());
    assert_eq!(
        report.refs_removed,
        vec![reg.reference("gc/b:v1").to_string()]
    );

    reg.stop();
    let again = n
        .client
        .pull(&reg.reference("gc/a:v1"), PullPolicy::IfNotPresent, None)
        .await
        .expect("kept module still served with the registry gone");
    assert_eq!(std::fs::read(&again.path).unwrap(), a_bytes);
    let e = n
        .client
        .pull(&reg.reference("gc/b:v1"), PullPolicy::IfNotPresent, None)
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::Unreachable { .. }), "{e}");
}

#[tokio::test]
async fn bearer_token_auth_through_a_token_server() {
    let (reg, tokens) = support::start_with_token_auth("tok", "p4ss", &["bearer/m"]);
    let r = reg.reference("bearer/m:v1");
    let mut good = Credentials::default();
    good.insert_basic(&reg.addr, "tok", "p4ss");

    let dir = tempfile::tempdir().unwrap();
    let (file, bytes) = wasm_file(dir.path(), "bearer");
    let e = node(Credentials::default())
        .client
        .push(&file, &r, &NoProgress)
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");
    let pusher = node(good.clone());
    pusher
        .client
        .push(&file, &r, &NoProgress)
        .await
        .expect("push with token");
    assert!(tokens.issued() >= 1);

    let anon = node(Credentials::default());
    let e = anon
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains(&r.to_string()), "{e}");

    let mut wrong = Credentials::default();
    wrong.insert_basic(&reg.addr, "tok", "nope");
    let e = node(wrong)
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, OciError::Unauthorized { .. }), "{e}");

    let puller = node(Credentials::default());
    let secret = format!(
        r#"{{"auths":{{"{}":{{"username":"tok","password":"p4ss"}}}}}}"#,
        reg.addr
    );
    let pod = Credentials::from_dockerconfigjson(secret.as_bytes()).unwrap();
    let p = puller
        .client
        .pull(&r, PullPolicy::Always, Some(&pod))
        .await
        .expect("pull with token from imagePullSecrets");
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);

    // a ready-made bearer token (`registrytoken` in a Docker config entry)
    let body = reqwest::Client::new()
        .get(format!(
            "http://{}/token?scope=repository:bearer/m:pull&service=wasinode-test-registry",
            tokens.addr
        ))
        .basic_auth("tok", Some("p4ss"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let cfg = format!(
        r#"{{"auths":{{"{}":{{"registrytoken":"{token}"}}}}}}"#,
        reg.addr
    );
    let bearer = node(Credentials::from_dockerconfigjson(cfg.as_bytes()).unwrap());
    let p = bearer
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .expect("pull with a registrytoken");
    assert_eq!(std::fs::read(&p.path).unwrap(), bytes);
}

/// A hand-written registry that lies: its manifest names the sha256 of one
/// module but the blob endpoint serves other bytes of the same length.
fn lying_registry(manifest: Vec<u8>, blob: Vec<u8>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let manifest_digest = sha256_digest(&manifest);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (ct, body, extra) = if path.contains("/manifests/") {
                (
                    OCI_MANIFEST,
                    manifest.clone(),
                    format!("Docker-Content-Digest: {manifest_digest}\r\n"),
                )
            } else if path.contains("/blobs/") {
                ("application/octet-stream", blob.clone(), String::new())
            } else {
                ("application/json", b"{}".to_vec(), String::new())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    addr
}

#[tokio::test]
async fn digest_mismatch_from_the_registry_is_refused() {
    let good = support::wasm("good");
    let mut evil = good.clone();
    let last = evil.len() - 1;
    evil[last] ^= 0xff;
    let (manifest, _) = oci::manifest::cncf_artifact(
        &oci::wasm::WasmKind::Module,
        &sha256_digest(&good),
        good.len() as u64,
    );
    let addr = lying_registry(manifest.clone(), evil);
    let n = node(Credentials::default());

    let r = oci::parse_reference(&format!("{addr}/liar/m:v1")).unwrap();
    let e = n
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(&r.to_string()), "{msg}");
    assert!(
        n.client.store().blobs().unwrap().is_empty(),
        "nothing stored"
    );
    assert!(n.client.local(&r).await.unwrap().is_none());

    // by digest: the manifest served is not the one asked for
    let other = format!("sha256:{}", "0".repeat(64));
    let r = oci::parse_reference(&format!("{addr}/liar/m@{other}")).unwrap();
    let e = n
        .client
        .pull(&r, PullPolicy::Always, None)
        .await
        .unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(&r.to_string()), "{msg}");
}

#[tokio::test]
async fn bounded_retry_gives_up_on_a_missing_reference() {
    let reg = Registry::start();
    let n = node(Credentials::default());
    let r = reg.reference("never/pushed:v1");
    let started = std::time::Instant::now();
    let e = n
        .client
        .pull_bounded(
            &r,
            PullPolicy::IfNotPresent,
            None,
            3,
            std::time::Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, OciError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains(&r.to_string()), "{e}");
    // 50 ms + 100 ms of waiting, three manifest requests
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
    let log = std::fs::read_to_string(&reg.log).unwrap();
    let gets = log
        .lines()
        .filter(|l| l.contains("\"GET /v2/never/pushed/manifests/v1 HTTP/1.1\" 404"))
        .count();
    assert_eq!(gets, 3);
}
