//! Registry credentials from Docker config files (`$DOCKER_CONFIG/config.json`
//! or `~/.docker/config.json`) and `kubernetes.io/dockerconfigjson` secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::OciError;

/// One registry's secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// HTTP basic credentials (also used to obtain bearer tokens from a token server).
    Basic { username: String, password: String },
    /// A ready-made bearer token (`registrytoken` in a Docker config entry).
    Bearer(String),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Auth::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// Credentials by registry host, from Docker config file(s) and/or
/// `dockerconfigjson` secrets. Keys are normalized (`https://index.docker.io/v1/`
/// becomes `docker.io`, schemes and paths are dropped, hosts are lowercased).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    entries: BTreeMap<String, Auth>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries.iter()).finish()
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: Option<BTreeMap<String, Entry>>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl Credentials {
    /// No credentials: every registry is accessed anonymously.
    pub fn none() -> Self {
        Self::default()
    }

    /// The Docker config file named by `$DOCKER_CONFIG` (a directory holding
    /// `config.json`) or else `~/.docker/config.json`. A missing file gives no
    /// credentials; a malformed one is an error naming the file.
    pub fn from_docker_config_env() -> Result<Self, OciError> {
        match docker_config_path() {
            Some(p) if p.exists() => Self::from_docker_config_file(&p),
            Some(p) => {
                tracing::debug!(path = %p.display(), "no Docker config file; anonymous registry access");
                Ok(Self::default())
            }
            None => Ok(Self::default()),
        }
    }

    /// Read one Docker config file (`{"auths": {HOST: {"auth": base64(user:pass)}}}`).
    pub fn from_docker_config_file(path: &Path) -> Result<Self, OciError> {
        let bytes = std::fs::read(path).map_err(|e| OciError::Credentials {
            source_name: path.display().to_string(),
            cause: e.to_string(),
        })?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// The `.dockerconfigjson` value of a `kubernetes.io/dockerconfigjson` secret
    /// (already base64-decoded by the Kubernetes client). The legacy
    /// `.dockercfg` shape (entries at top level, no `auths`) is accepted too.
    pub fn from_dockerconfigjson(bytes: &[u8]) -> Result<Self, OciError> {
        Self::parse(bytes, "dockerconfigjson secret")
    }

    fn parse(bytes: &[u8], source_name: &str) -> Result<Self, OciError> {
        let err = |cause: String| OciError::Credentials {
            source_name: source_name.to_string(),
            cause,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| err(format!("not JSON: {e}")))?;
        let is_new_format = value.get("auths").is_some()
            || value.get("credsStore").is_some()
            || value.get("credHelpers").is_some();
        let entries: BTreeMap<String, Entry> = if is_new_format {
            let file: ConfigFile =
                serde_json::from_value(value).map_err(|e| err(format!("unexpected shape: {e}")))?;
            if let Some(store) = &file.creds_store {
                tracing::warn!(
                    source = source_name,
                    store,
                    "credsStore credential helpers are not supported; only `auths` entries are used"
                );
            }
            if file.cred_helpers.as_ref().is_some_and(|h| !h.is_empty()) {
                tracing::warn!(
                    source = source_name,
                    "credHelpers are not supported; only `auths` entries are used"
                );
            }
            file.auths.unwrap_or_default()
        } else {
            serde_json::from_value(value).map_err(|e| err(format!("unexpected shape: {e}")))?
        };
        let mut out = Credentials::default();
        for (key, e) in entries {
            let host = normalize_registry(&key);
            let auth = if let Some(token) = e.registrytoken.filter(|t| !t.is_empty()) {
                Auth::Bearer(token)
            } else if let Some(a) = e.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|e| err(format!("{key}: `auth` is not base64: {e}")))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| err(format!("{key}: `auth` is not UTF-8")))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| err(format!("{key}: `auth` is not base64 of user:password")))?;
                Auth::Basic {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (e.username, e.password) {
                Auth::Basic {
                    username: u,
                    password: p,
                }
            } else if e.identitytoken.is_some() {
                tracing::warn!(source = source_name, registry = %key, "identitytoken (OAuth refresh token) entries are not supported; skipped");
                continue;
            } else {
                tracing::debug!(source = source_name, registry = %key, "auths entry without credentials; skipped");
                continue;
            };
            out.entries.insert(host, auth);
        }
        Ok(out)
    }

    /// Add or replace one registry's basic credentials.
    pub fn insert_basic(&mut self, registry: &str, username: &str, password: &str) {
        self.entries.insert(
            normalize_registry(registry),
            Auth::Basic {
                username: username.into(),
                password: password.into(),
            },
        );
    }

    /// `self` overlaid with `other`: `other`'s entry wins for a registry both name
    /// (a pod's `imagePullSecrets` over the node's Docker config).
    pub fn merged(&self, other: &Credentials) -> Credentials {
        let mut out = self.clone();
        for (k, v) in &other.entries {
            out.entries.insert(k.clone(), v.clone());
        }
        out
    }

    /// The secret for a registry host (as in `Reference::registry()`), if any.
    pub fn lookup(&self, registry: &str) -> Option<&Auth> {
        self.entries.get(&normalize_registry(registry))
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The registries this holds credentials for (normalized).
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// Normalize a Docker config `auths` key or a registry host to a lookup key:
/// drop the scheme and any path, lowercase, and fold Docker Hub's aliases to `docker.io`.
pub fn normalize_registry(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | "docker.io" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Auth {
        Auth::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn docker_config_forms() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                "http://Reg.Example.com:8443/v2/": {{"auth": "{b64}", "email": "x@y"}},
                "tok.example": {{"registrytoken": "T0K"}},
                "empty.example": {{}},
                "idtok.example": {{"identitytoken": "refresh"}}
            }}, "HttpHeaders": {{"User-Agent": "x"}}}}"#
        );
        let c = Credentials::from_dockerconfigjson(json.as_bytes()).unwrap();
        assert_eq!(c.lookup("docker.io"), Some(&basic("alice", "s3cr:et")));
        assert_eq!(
            c.lookup("index.docker.io"),
            Some(&basic("alice", "s3cr:et"))
        );
        assert_eq!(c.lookup("127.0.0.1:5000"), Some(&basic("bob", "pw")));
        assert_eq!(
            c.lookup("reg.example.com:8443"),
            Some(&basic("alice", "s3cr:et"))
        );
        assert_eq!(c.lookup("tok.example"), Some(&Auth::Bearer("T0K".into())));
        assert_eq!(c.lookup("empty.example"), None);
        assert_eq!(c.lookup("idtok.example"), None);
        assert_eq!(c.lookup("127.0.0.1:5001"), None);
        // secrets never show in Debug
        assert!(!format!("{c:?}").contains("s3cr"));
    }

    #[test]
    fn legacy_dockercfg_and_errors() {
        let c =
            Credentials::from_dockerconfigjson(br#"{"r.io": {"username": "u", "password": "p"}}"#)
                .unwrap();
        assert_eq!(c.lookup("r.io"), Some(&basic("u", "p")));
        let e = Credentials::from_dockerconfigjson(b"nope")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dockerconfigjson secret") && e.contains("not JSON"),
            "{e}"
        );
        let e = Credentials::from_dockerconfigjson(br#"{"auths": {"r.io": {"auth": "!!!"}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.io") && e.contains("base64"), "{e}");
        let nocolon = base64::engine::general_purpose::STANDARD.encode("justuser");
        let e = Credentials::from_dockerconfigjson(
            format!(r#"{{"auths": {{"r.io": {{"auth": "{nocolon}"}}}}}}"#).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("user:password"), "{e}");
    }

    #[test]
    fn merged_prefers_other() {
        let mut a = Credentials::default();
        a.insert_basic("r.io", "node", "n");
        a.insert_basic("only.node", "node", "n");
        let mut b = Credentials::default();
        b.insert_basic("https://r.io/", "pod", "p");
        let m = a.merged(&b);
        assert_eq!(m.lookup("r.io"), Some(&basic("pod", "p")));
        assert_eq!(m.lookup("only.node"), Some(&basic("node", "n")));
    }

    #[test]
    fn config_file_missing_and_present() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Credentials::from_docker_config_file(&dir.path().join("config.json")).is_err());
        std::fs::write(
            dir.path().join("config.json"),
            br#"{"auths": {"localhost:5000": {"username": "u", "password": "p"}}, "credsStore": "desktop"}"#,
        )
        .unwrap();
        let c = Credentials::from_docker_config_file(&dir.path().join("config.json")).unwrap();
        assert_eq!(c.lookup("localhost:5000"), Some(&basic("u", "p")));
    }
}
