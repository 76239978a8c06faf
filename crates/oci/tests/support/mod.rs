//! A real CNCF distribution registry (Debian's `docker-registry`, installed by
//! `tools/setup`) on a free loopback port, with a temp storage dir and its
//! access log in a file; killed on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    /// (user, password) when started with htpasswd auth.
    pub basic: Option<(String, String)>,
    pki: Option<tempfile::TempDir>,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_inner(None)
    }

    pub fn start_with_htpasswd(user: &str, password: &str) -> Registry {
        Self::start_inner(Some((user.to_string(), password.to_string())))
    }

    /// Token (bearer) auth as Docker Hub does it: the registry answers 401 with a
    /// `Bearer realm=…` challenge; a token server on loopback checks basic
    /// credentials and hands out a JWT (RS256, signed with `openssl`, x5c
    /// header) granting pull+push on `repos`.
    pub fn start_with_token_auth(
        user: &str,
        password: &str,
        repos: &[&str],
    ) -> (Registry, TokenServer) {
        let pki = tempfile::tempdir().expect("tempdir");
        let key = pki.path().join("key.pem");
        let cert = pki.path().join("cert.pem");
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=wasinode-test-token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (installed by tools/setup)");
        assert!(ok.success(), "openssl req failed");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("openssl x509");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [b64(&der.stdout)]});
        let access: Vec<_> = repos
            .iter()
            .map(|r| serde_json::json!({"type": "repository", "name": r, "actions": ["pull", "push"]}))
            .collect();
        let claims = serde_json::json!({
            "iss": "wasinode-test-issuer", "sub": user, "aud": "wasinode-test-registry",
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60, "jti": format!("{now}"),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let input_file = pki.path().join("input");
        std::fs::write(&input_file, &signing_input).expect("write");
        let sig = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .arg(&input_file)
            .output()
            .expect("openssl dgst");
        assert!(sig.status.success(), "openssl dgst failed");
        let token = format!("{signing_input}.{}", b64url(&sig.stdout));
        let server = TokenServer::start(user, password, token);
        let auth = format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: wasinode-test-registry\n    issuer: wasinode-test-issuer\n    rootcertbundle: {}\n",
            server.addr,
            cert.display()
        );
        let mut reg = Self::start_with_auth_yaml(None, auth);
        reg.pki = Some(pki);
        (reg, server)
    }

    fn start_inner(basic: Option<(String, String)>) -> Registry {
        Self::start_with_auth_yaml(basic, String::new())
    }

    fn start_with_auth_yaml(basic: Option<(String, String)>, token_auth: String) -> Registry {
        assert!(
            std::path::Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: run tools/setup (Debian package docker-registry)"
        );
        let mut dir = tempfile::tempdir().expect("tempdir");
        let mut auth = token_auth;
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
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
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
                addr: addr.clone(),
                dir,
                log,
                basic: basic.clone(),
                pki: None,
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

    /// `127.0.0.1:PORT/<repo>`
    pub fn reference(&self, repo_and_tag: &str) -> oci::Reference {
        oci::parse_reference(&format!("{}/{repo_and_tag}", self.addr)).expect("reference")
    }

    /// Successful `GET /v2/.../blobs/<digest>` requests in the access log.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let needle = format!("/blobs/{digest} HTTP/1.1\" 200");
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .count()
    }

    /// Upload a blob by raw HTTP (monolithic upload). Returns its digest.
    pub async fn raw_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = oci::store::sha256_digest(bytes);
        let http = self.http();
        let res = self
            .auth(http.post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr)))
            .send()
            .await
            .expect("start upload");
        assert_eq!(res.status().as_u16(), 202, "start upload: {}", res.status());
        let loc = res
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("Location")
            .to_string();
        let mut url = if loc.starts_with("http") {
            loc
        } else {
            format!("http://{}{loc}", self.addr)
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let res = self
            .auth(http.put(url))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("put blob");
        assert_eq!(res.status().as_u16(), 201, "put blob: {}", res.status());
        digest
    }

    /// PUT a manifest by raw HTTP. Returns its digest.
    pub async fn raw_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let res = self
            .auth(
                self.http()
                    .put(format!("http://{}/v2/{repo}/manifests/{tag}", self.addr)),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("put manifest");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        assert_eq!(status, 201, "put manifest: {text}");
        oci::store::sha256_digest(body)
    }

    fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    fn auth(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.basic {
            Some((u, p)) => b.basic_auth(u, Some(p)),
            None => b,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A small valid module; `tag` makes its bytes (and digest) unique.
pub fn wasm(tag: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module (memory 1) (data (i32.const 0) "{tag}") (func (export "_start")))"#
    ))
    .expect("wat")
}

/// Write a module to a temp file.
pub fn wasm_file(dir: &std::path::Path, tag: &str) -> (PathBuf, Vec<u8>) {
    let bytes = wasm(tag);
    let p = dir.join(format!("{tag}.wasm"));
    std::fs::write(&p, &bytes).expect("write wasm");
    (p, bytes)
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A minimal token server: `GET /token?...` with the right basic credentials
/// gets `{"token": …}`, anything else 401. Counts the tokens it issued.
pub struct TokenServer {
    pub addr: String,
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TokenServer {
    fn start(user: &str, password: &str, token: String) -> TokenServer {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let addr = listener.local_addr().expect("addr").to_string();
        let expected = format!("Basic {}", b64(format!("{user}:{password}").as_bytes()));
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (issued2, stop2) = (issued.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut authorized = false;
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("authorization")
                        && v.trim() == expected
                    {
                        authorized = true;
                    }
                }
                let (status, body) = if authorized {
                    issued2.fetch_add(1, Ordering::Relaxed);
                    (
                        "200 OK",
                        serde_json::json!({"token": token, "expires_in": 3600}).to_string(),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"details":"bad credentials"}"#.to_string(),
                    )
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer { addr, issued, stop }
    }

    /// Tokens handed out so far.
    pub fn issued(&self) -> usize {
        self.issued.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}
