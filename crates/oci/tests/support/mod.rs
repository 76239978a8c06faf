//! oci-test-specific parts of the registry harness: the registry itself (start, htpasswd, access
//! log, raw uploads) is shared with the end-to-end tests in `e2e::registry`; here are the
//! `oci::Reference` helper, test modules, and a token server for bearer auth.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

pub use e2e::registry::Registry;

/// `oci` types for the shared harness.
pub trait RegistryExt {
    /// `127.0.0.1:PORT/<repo>`
    fn reference(&self, repo_and_tag: &str) -> oci::Reference;
}

impl RegistryExt for Registry {
    fn reference(&self, repo_and_tag: &str) -> oci::Reference {
        oci::parse_reference(&self.image(repo_and_tag)).expect("reference")
    }
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
    let mut server = TokenServer::start(user, password, token);
    let auth = format!(
        "auth:\n  token:\n    realm: http://{}/token\n    service: wasinode-test-registry\n    issuer: wasinode-test-issuer\n    rootcertbundle: {}\n",
        server.addr,
        cert.display()
    );
    let reg = Registry::start_with_auth_yaml(&auth);
    server._pki = Some(pki);
    (reg, server)
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

use e2e::registry::base64 as b64;

fn b64url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A minimal token server: `GET /token?...` with the right basic credentials
/// gets `{"token": …}`, anything else 401. Counts the tokens it issued.
pub struct TokenServer {
    pub addr: String,
    /// The signing key and certificate the registry trusts.
    _pki: Option<tempfile::TempDir>,
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
        TokenServer {
            addr,
            _pki: None,
            issued,
            stop,
        }
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
