//! A real CNCF distribution registry (Debian's `docker-registry`, installed by `tools/setup`) on a
//! free loopback port, with a temp storage dir and its access log in a file; killed on drop.
//!
//! Optional htpasswd basic auth, or any `auth:` section (the oci crate's tests put a token server
//! behind it). Raw uploads (`raw_blob`, `raw_manifest`) speak HTTP over a plain `TcpStream`, so a
//! test can publish layouts no client writes (wasm-to-oci, Docker images, indexes).
//!
//! Shared by the e2e tests (`tests/tests/oci_run.rs`) and the oci crate's registry tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wasinode::{HttpResponse, http};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// Storage, config and logs.
    pub dir: tempfile::TempDir,
    /// Everything the registry printed, access log included.
    pub log: PathBuf,
    /// (user, password) when started with htpasswd auth.
    pub basic: Option<(String, String)>,
    /// Guests pushed by [`Registry::push_guest`].
    pushed: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Registry {
    /// No auth.
    pub fn start() -> Registry {
        Self::start_inner(None, String::new())
    }

    /// htpasswd basic auth with one user.
    pub fn start_with_htpasswd(user: &str, password: &str) -> Registry {
        Self::start_inner(
            Some((user.to_string(), password.to_string())),
            String::new(),
        )
    }

    /// With a ready-made `auth:` section of the registry's config (e.g. token auth).
    pub fn start_with_auth_yaml(auth_yaml: &str) -> Registry {
        Self::start_inner(None, auth_yaml.to_string())
    }

    fn start_inner(basic: Option<(String, String)>, auth_yaml: String) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: run tools/setup (Debian package docker-registry)"
        );
        let mut dir = tempfile::tempdir().expect("tempdir");
        let mut auth = auth_yaml;
        if let Some((u, p)) = &basic {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils, installed by tools/setup)");
            assert!(out.status.success(), "htpasswd failed");
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).expect("write htpasswd");
            auth = format!(
                "auth:\n  htpasswd:\n    realm: wasinode-test\n    path: {}\n",
                path.display()
            );
        }
        for attempt in 0..5 {
            let port = crate::wasinode::free_port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: wasinode-test-secret\n{auth}",
                    dir.path().join("data").display()
                ),
            )
            .expect("write config");
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let logf = std::fs::File::create(&log).expect("log file");
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("dup log"))
                .stderr(logf)
                .spawn()
                .expect("spawn docker-registry");
            let mut reg = Registry {
                child: Some(child),
                addr,
                dir,
                log,
                basic: basic.clone(),
                pushed: Default::default(),
            };
            if reg.wait_ready() {
                return reg;
            }
            reg.stop();
            dir = std::mem::replace(&mut reg.dir, tempfile::tempdir().expect("tempdir"));
        }
        panic!("docker-registry did not start");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return false;
            }
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Kill the registry (the port stops answering).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The reference of guest module `name` (built by `tools/build-guests`) in this registry,
    /// `127.0.0.1:PORT/guests/<name>:v1`, pushed by `wasinode push` the first time it is asked
    /// for. Node mode takes registry references only, so node tests run their guests this way.
    pub fn push_guest(&self, name: &str) -> anyhow::Result<String> {
        let reference = self.image(&format!("guests/{}:v1", name.replace('_', "-")));
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if !pushed.contains(name) {
            let file = crate::guests::guest(name)?;
            let data = self.dir.path().join("push-data");
            crate::wasinode::push(&file, &reference, &data, &[])?;
            pushed.insert(name.to_string());
        }
        Ok(reference)
    }

    /// The reference of component `name` (built by `tools/build-components`) in this registry,
    /// `127.0.0.1:PORT/components/<name>:v1`, pushed the first time it is asked for.
    pub fn push_component(&self, name: &str) -> anyhow::Result<String> {
        let reference = self.image(&format!("components/{name}:v1"));
        let key = format!("component:{name}");
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if !pushed.contains(&key) {
            let file = crate::guests::component(name)?;
            let data = self.dir.path().join("push-data");
            crate::wasinode::push(&file, &reference, &data, &[])?;
            pushed.insert(key);
        }
        Ok(reference)
    }

    /// `127.0.0.1:PORT/<repo_and_tag>`, as a user writes it in a manifest.
    pub fn image(&self, repo_and_tag: &str) -> String {
        format!("{}/{repo_and_tag}", self.addr)
    }

    /// The registry's output so far (access log lines included).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Status codes of the `METHOD PATH` requests in the access log, in order
    /// (e.g. `requests("GET", "/v2/demo/hello/manifests/v1")`).
    pub fn requests(&self, method: &str, path: &str) -> Vec<u16> {
        let needle = format!("\"{method} {path} HTTP/1.1\" ");
        self.log_text()
            .lines()
            .filter_map(|l| l.split_once(&needle))
            .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Successful `GET /v2/<any repo>/blobs/<digest>` requests in the access log.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\" 200");
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .count()
    }

    /// One request to the registry, with basic auth when it was started with htpasswd.
    /// `target` is a path (`/v2/...`) or an absolute `http://` URL on this registry.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        let path = target
            .strip_prefix("http://")
            .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or(target);
        let auth = self
            .basic
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            all.push(("Authorization", a));
        }
        http(method, &self.addr, path, &all, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e:#}", self.addr))
    }

    /// Upload a blob by raw HTTP (monolithic upload: POST, then PUT with the digest). Returns its
    /// digest.
    pub fn raw_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let res = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");
        assert_eq!(res.status, 202, "start upload: {res:?}");
        let loc = res.header("location").expect("Location").to_string();
        let mut url = loc;
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let res = self.request(
            "PUT",
            &url,
            &[("Content-Type", "application/octet-stream")],
            bytes,
        );
        assert_eq!(res.status, 201, "put blob: {res:?}");
        digest
    }

    /// PUT a manifest by raw HTTP. Returns its digest.
    pub fn raw_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let res = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", media_type)],
            body,
        );
        assert_eq!(res.status, 201, "put manifest: {res:?}");
        sha256_digest(body)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `sha256:<hex>` of `bytes` (by coreutils' `sha256sum`; this crate has no hashing dependency).
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8_lossy(&out.stdout);
    format!(
        "sha256:{}",
        text.split_whitespace().next().unwrap_or_default()
    )
}

/// Standard base64 with padding (for `Authorization: Basic` and Docker config `auth` fields).
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Standard base64 (padding and whitespace tolerated).
pub fn unbase64(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(clean)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_of_empty() {
        assert_eq!(
            super::sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
