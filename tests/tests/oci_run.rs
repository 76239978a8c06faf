//! Issue 4 end to end: `wasinode push`, `wasinode pull` and `wasinode run` against a real
//! distribution registry (Debian's `docker-registry`) on loopback. Each test asserts what a user
//! observes: digests printed, HTTP bodies, exit codes, messages on stderr, and what the registry's
//! access log saw.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use e2e::guests::guest;
use e2e::registry::{Registry, base64, sha256_digest};
use e2e::wasinode::{Wasinode, binary, free_port, get, write_file};

const T: Duration = Duration::from_secs(60);

/// A WAGI pod serving the `hello` guest at `/hello` on `addr`, from `image`.
fn wagi_pod(name: &str, addr: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{addr}\"\n    alpha.wagi.krustlet.dev/modules: '{{\"hello\": {{\"route\": \"/hello\"}}}}'\nspec:\n  containers:\n    - name: hello\n      image: {image}\n"
    )
}

fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// One machine running wasinode: a data dir kept across runs, and a Docker config dir
/// (`$DOCKER_CONFIG`, empty unless `login` wrote a config.json), so nothing of the user's own
/// configuration leaks in.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Result<Node> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("docker"))?;
        Ok(Node { dir })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn docker_config(&self) -> PathBuf {
        self.dir.path().join("docker")
    }

    /// Writes `$DOCKER_CONFIG/config.json` with basic credentials for `registry`.
    fn login(&self, registry: &str, user: &str, password: &str) -> Result<()> {
        let auth = base64(format!("{user}:{password}").as_bytes());
        write_file(
            &self.docker_config(),
            "config.json",
            &format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#),
        )?;
        Ok(())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary());
        c.args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("DOCKER_CONFIG", self.docker_config())
            .env("WASINODE_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    /// `wasinode push|pull ...` to completion.
    fn cli(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("cannot run {} (cargo build --release)", binary().display()))
    }

    /// `wasinode push FILE REF`: the digest printed on stdout.
    fn push(&self, file: &Path, reference: &str) -> Result<String> {
        e2e::wasinode::push(
            file,
            reference,
            &self.data_dir(),
            &[("DOCKER_CONFIG", &self.docker_config())],
        )
    }

    /// `wasinode run --quiet <manifest>` with `yaml` written to a file in this node's dir.
    fn run(&self, yaml: &str) -> Result<Wasinode> {
        let n = std::fs::read_dir(self.dir.path())?.count();
        let manifest = write_file(self.dir.path(), &format!("pod-{n}.yaml"), yaml)?;
        let log = self.dir.path().join(format!("run-{n}.out"));
        let cmd = self.command(&["run", "--quiet", &manifest.display().to_string()]);
        Wasinode::spawn(cmd, log, self.data_dir(), None)
    }
}

fn hello_wasm() -> Result<PathBuf> {
    guest("hello")
}

/// Runs one WAGI pod from `image` on `node`, checks `GET /hello`, stops it with Ctrl-C (exit 0).
fn serve_hello(node: &Node, image: &str) -> Result<String> {
    let a = addr();
    let mut run = node.run(&wagi_pod("hello", &a, image))?;
    run.wait_listening(&a, T)?;
    let r = get(&a, "/hello")?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello world\n"),
        "{}",
        run.output()
    );
    // The listener accepts (into its backlog) before the start line is printed: wait for it.
    let out = run.wait_output(&format!("default/hello serving http://{a}"), T)?;
    assert!(!out.contains("error"), "{out}");
    let st = run.interrupt(T)?;
    assert!(st.success(), "Ctrl-C exits 0: {st}\n{}", run.output());
    Ok(out)
}

#[test]
fn push_prints_the_manifest_digest_and_pull_prints_the_same() -> Result<()> {
    let reg = Registry::start();
    let image = reg.image("demo/hello:v1");
    let digest = Node::new()?.push(&hello_wasm()?, &image)?;
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "push prints the manifest digest: {digest:?}"
    );
    assert_eq!(
        reg.requests("PUT", "/v2/demo/hello/manifests/v1"),
        vec![201],
        "one manifest PUT"
    );

    let puller = Node::new()?;
    let out = puller.cli(&["pull", &image])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    // by digest too
    let by_digest = reg.image(&format!("demo/hello@{digest}"));
    let out = Node::new()?.cli(&["pull", &by_digest])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    Ok(())
}

#[test]
fn run_serves_a_pushed_module_by_tag_and_by_digest() -> Result<()> {
    let reg = Registry::start();
    let image = reg.image("demo/hello:v1");
    let digest = Node::new()?.push(&hello_wasm()?, &image)?;

    // each run on a fresh node: the module really comes from the registry
    serve_hello(&Node::new()?, &image)?;
    assert_eq!(
        reg.requests("GET", "/v2/demo/hello/manifests/v1"),
        vec![200]
    );

    let by_digest = reg.image(&format!("demo/hello@{digest}"));
    serve_hello(&Node::new()?, &by_digest)?;
    assert_eq!(
        reg.requests("GET", &format!("/v2/demo/hello/manifests/{digest}")),
        vec![200]
    );
    Ok(())
}

#[test]
fn run_serves_a_hand_written_wasm_to_oci_artifact() -> Result<()> {
    let reg = Registry::start();
    let bytes = std::fs::read(hello_wasm()?)?;
    // the layout wasm-to-oci wrote for Krustlet's images, uploaded by raw HTTP
    let layer = reg.raw_blob("krustlet/hello", &bytes);
    let config = b"{}";
    let config_d = reg.raw_blob("krustlet/hello", config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.wasm.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.wasm.content.layer.v1+wasm","digest":"{layer}","size":{},"annotations":{{"org.opencontainers.image.title":"module.wasm"}}}}]}}"#,
        config.len(),
        bytes.len()
    );
    reg.raw_manifest(
        "krustlet/hello",
        "v1.0.0",
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    );
    serve_hello(&Node::new()?, &reg.image("krustlet/hello:v1.0.0"))?;
    assert_eq!(reg.blob_gets(&layer), 1);
    Ok(())
}

#[test]
fn private_registry_needs_credentials_from_the_docker_config() -> Result<()> {
    let reg = Registry::start_with_htpasswd("wasi", "s3cret");
    let image = reg.image("private/hello:v1");
    let pusher = Node::new()?;
    assert!(
        pusher.push(&hello_wasm()?, &image).is_err(),
        "push without credentials fails"
    );
    pusher.login(&reg.addr, "wasi", "s3cret")?;
    pusher.push(&hello_wasm()?, &image)?;

    // no credentials: the pod cannot start, and as no pod started, run exits non-zero
    let anon = Node::new()?;
    let a = addr();
    let mut run = anon.run(&wagi_pod("hello", &a, &image))?;
    let st = run.wait_exit(T)?;
    let out = run.output();
    assert!(!st.success(), "{out}");
    let err = out
        .lines()
        .find(|l| l.starts_with("wasinode: error:") && l.contains(&image))
        .with_context(|| format!("no error naming {image}:\n{out}"))?;
    assert!(err.contains("unauthorized"), "{err}");
    assert!(!e2e::wasinode::listening(&a));

    // wrong password: still unauthorized
    let wrong = Node::new()?;
    wrong.login(&reg.addr, "wasi", "nope")?;
    let mut run = wrong.run(&wagi_pod("hello", &a, &image))?;
    assert!(!run.wait_exit(T)?.success());
    assert!(run.output().contains("unauthorized"), "{}", run.output());

    // with $DOCKER_CONFIG/config.json auths: served
    let user = Node::new()?;
    user.login(&reg.addr, "wasi", "s3cret")?;
    serve_hello(&user, &image)?;
    Ok(())
}

#[test]
fn a_pulled_module_is_served_when_the_registry_is_gone() -> Result<()> {
    let mut reg = Registry::start();
    let image = reg.image("offline/hello:v1");
    let node = Node::new()?;
    node.push(&hello_wasm()?, &image)?;
    serve_hello(&node, &image)?;

    reg.stop();
    assert!(!e2e::wasinode::listening(&reg.addr));
    // same data dir: a non-latest tag defaults to IfNotPresent, so the store answers
    serve_hello(&node, &image)?;

    // a tag this node never pulled cannot start without the registry
    let a = addr();
    let mut run = node.run(&wagi_pod("other", &a, &reg.image("offline/hello:v2")))?;
    assert!(!run.wait_exit(T)?.success());
    assert!(
        run.output().contains("offline/hello:v2"),
        "{}",
        run.output()
    );
    Ok(())
}

#[test]
fn a_missing_reference_fails_its_pod_only() -> Result<()> {
    let reg = Registry::start();
    let good = reg.image("demo/hello:v1");
    Node::new()?.push(&hello_wasm()?, &good)?;
    let missing = reg.image("demo/nothing:v1");

    // alone: nothing started, exit non-zero, the error names the reference
    let node = Node::new()?;
    let mut run = node.run(&wagi_pod("lost", &addr(), &missing))?;
    let st = run.wait_exit(T)?;
    let out = run.output();
    assert!(!st.success(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("wasinode: error:")
            && l.contains(&missing)
            && l.contains("not found")),
        "{out}"
    );

    // next to a good pod in the same manifest: the good one serves
    let (a, b) = (addr(), addr());
    let yaml = format!(
        "{}---\n{}",
        wagi_pod("lost", &b, &missing),
        wagi_pod("hello", &a, &good)
    );
    let mut run = node.run(&yaml)?;
    run.wait_listening(&a, T)?;
    let out = run.wait_output("1 of 2 pod(s) started", T)?;
    assert_eq!(get(&a, "/hello")?.body, "hello world\n");
    assert!(
        out.lines()
            .any(|l| l.starts_with("wasinode: error:") && l.contains(&missing)),
        "{out}"
    );
    assert!(!e2e::wasinode::listening(&b));
    let st = run.interrupt(T)?;
    assert!(
        st.success(),
        "Ctrl-C exits 0 when a pod started: {st}\n{}",
        run.output()
    );
    Ok(())
}

#[test]
fn two_pods_with_one_reference_download_the_layer_once() -> Result<()> {
    let reg = Registry::start();
    let image = reg.image("shared/hello:v1");
    let wasm = hello_wasm()?;
    Node::new()?.push(&wasm, &image)?;
    let layer = sha256_digest(&std::fs::read(&wasm)?);
    assert_eq!(reg.blob_gets(&layer), 0);

    let (a, b) = (addr(), addr());
    let yaml = format!(
        "{}---\n{}",
        wagi_pod("one", &a, &image),
        wagi_pod("two", &b, &image)
    );
    let node = Node::new()?;
    let mut run = node.run(&yaml)?;
    run.wait_listening(&a, T)?;
    run.wait_listening(&b, T)?;
    assert_eq!(get(&a, "/hello")?.body, "hello world\n");
    assert_eq!(get(&b, "/hello")?.body, "hello world\n");
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.log_text());
    assert!(run.interrupt(T)?.success());
    Ok(())
}

#[test]
fn pull_cli_errors_name_the_reference() -> Result<()> {
    let reg = Registry::start();
    let node = Node::new()?;

    let missing = reg.image("demo/hello:nope");
    let out = node.cli(&["pull", &missing])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&missing), "{err}");
    assert!(out.stdout.is_empty());

    // pushed, but never pulled on this node: Never refuses
    let image = reg.image("demo/hello:v1");
    Node::new()?.push(&hello_wasm()?, &image)?;
    let out = node.cli(&["pull", &image, "--policy", "Never"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&image) && err.contains("Never"), "{err}");
    // once pulled, Never is satisfied from the store
    let digest = String::from_utf8_lossy(&node.cli(&["pull", &image])?.stdout)
        .trim()
        .to_string();
    assert!(digest.starts_with("sha256:"), "{digest:?}");
    let out = node.cli(&["pull", &image, "--policy", "Never"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    Ok(())
}
