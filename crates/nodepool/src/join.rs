//! How a pool's agents join: a bootstrap token (as `kubeadm token create` makes one), the RBAC
//! bindings that let `system:bootstrappers` request node client certificates and have them
//! auto-approved, and the bootstrap kubeconfig the agents start with.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::{Error, IoOp, Op};

/// Label on the token Secrets a pool created, so its deletion removes them.
pub const TOKEN_POOL_LABEL: &str = "wasinode.dev/nodepool";
/// How long a pool's bootstrap token may be used to join new nodes.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The three bindings kubeadm (and `tools/cluster`) create for node bootstrap, under our names.
const BINDINGS: [(&str, &str, &str); 3] = [
    (
        "wasinode:node-bootstrapper",
        "system:node-bootstrapper",
        "system:bootstrappers",
    ),
    (
        "wasinode:node-autoapprove-bootstrap",
        "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
        "system:bootstrappers",
    ),
    (
        "wasinode:node-autoapprove-certificate-rotation",
        "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
        "system:nodes",
    ),
];

/// Creates the bootstrap RBAC bindings that are missing.
pub async fn ensure_bindings(client: &kube::Client) -> Result<(), Error> {
    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
    for (name, role, group) in BINDINGS {
        let crb = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: role.into(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Group".into(),
                name: group.into(),
                namespace: None,
            }]),
        };
        match api.create(&PostParams::default(), &crb).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(kube::Error::Api(s)) if s.code == 403 => {
                return Err(Error::BindingForbidden(name.to_string()));
            }
            Err(e) => return Err(Error::api(Op::CreateBinding(name.to_string()))(e)),
        }
    }
    Ok(())
}

/// A bootstrap token, `<id>.<secret>` as kubeadm makes them (`[a-z0-9]{6}.[a-z0-9]{16}`).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl std::fmt::Debug for Token {
    /// The secret half stays out of logs and debug dumps.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

impl Token {
    /// A fresh random token.
    pub fn generate() -> Result<Token, Error> {
        Ok(Token {
            id: random_chars(6)?,
            secret: random_chars(16)?,
        })
    }
}

fn random_chars(n: usize) -> Result<String, Error> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(Error::Random)?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

/// The kube-system Secret that makes `token` a bootstrap token of `pool` until `expires`, as the
/// API server's bootstrap authenticator reads it: its agents authenticate as
/// `system:bootstrap:<id>` in `system:bootstrappers` (and `system:bootstrappers:wasinode:<pool>`).
pub fn token_secret(pool: &str, token: &Token, expires: SystemTime) -> Result<Secret, Error> {
    let expires = k8s_openapi::jiff::Timestamp::try_from(expires)
        .map_err(|e| Error::Encode {
            what: "the token's expiry",
            source: e.into(),
        })?
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let data = [
        ("description", format!("wasinode node pool {pool}")),
        ("token-id", token.id.clone()),
        ("token-secret", token.secret.clone()),
        ("expiration", expires),
        ("usage-bootstrap-authentication", "true".into()),
        ("usage-bootstrap-signing", "true".into()),
        (
            "auth-extra-groups",
            format!("system:bootstrappers:wasinode:{pool}"),
        ),
    ];
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(format!("bootstrap-token-{}", token.id)),
            namespace: Some("kube-system".into()),
            labels: Some(BTreeMap::from([(
                TOKEN_POOL_LABEL.to_string(),
                pool.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("bootstrap.kubernetes.io/token".into()),
        string_data: Some(data.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        ..Default::default()
    })
}

/// Creates a bootstrap token Secret for `pool` in kube-system, valid for [`TOKEN_TTL`].
pub async fn create_token(client: &kube::Client, pool: &str) -> Result<Token, Error> {
    let token = Token::generate()?;
    let s = token_secret(pool, &token, SystemTime::now() + TOKEN_TTL)?;
    let api: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    match api.create(&PostParams::default(), &s).await {
        Ok(_) => Ok(token),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(Error::TokenForbidden),
        Err(e) => Err(Error::api(Op::CreateToken)(e)),
    }
}

/// Deletes the bootstrap tokens `pool` created.
pub async fn delete_tokens(client: &kube::Client, pool: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let lp = ListParams::default().labels(&format!("{TOKEN_POOL_LABEL}={pool}"));
    for s in api.list(&lp).await.map_err(Error::api(Op::ListTokens))? {
        if let Some(name) = s.metadata.name {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::api(Op::DeleteToken)(e)),
            }
        }
    }
    Ok(())
}

/// Writes a kubeconfig for the cluster of `admin` (its current context) that authenticates with
/// `token`, mode 0600.
pub fn write_bootstrap_kubeconfig(admin: &Path, token: &Token, out: &Path) -> Result<(), Error> {
    let kc =
        kube::config::Kubeconfig::read_from(admin).map_err(|source| Error::ReadKubeconfig {
            path: admin.to_path_buf(),
            source,
        })?;
    let mut cluster_entry =
        node::bootstrap::cluster_of(&kc).map_err(|e| Error::Kubeconfig(e.into()))?;
    // The agents read the bootstrap kubeconfig from elsewhere: embed a CA given as a file.
    if let Some(file) = cluster_entry
        .get("certificate-authority")
        .and_then(|f| f.as_str())
        .map(str::to_string)
    {
        let file = admin.parent().unwrap_or(Path::new(".")).join(file);
        let pem = std::fs::read(&file).map_err(Error::io(IoOp::ReadCa, &file))?;
        if let Some(obj) = cluster_entry.as_object_mut() {
            obj.remove("certificate-authority");
        }
        cluster_entry["certificate-authority-data"] = json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &pem
        ));
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster_entry}],
        "users": [{"name": "bootstrap", "user": {"token": token.to_string()}}],
        "contexts": [{"name": "bootstrap", "context": {"cluster": "cluster", "user": "bootstrap"}}],
        "current-context": "bootstrap",
    });
    let text = serde_yaml::to_string(&doc).map_err(|e| Error::Encode {
        what: "the bootstrap kubeconfig",
        source: e.into(),
    })?;
    write_private(out, text.as_bytes())
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io(IoOp::Write, &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::io(IoOp::Write, &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(IoOp::Write, path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_secret_is_what_the_bootstrap_authenticator_reads() {
        let token = Token {
            id: "abc123".into(),
            secret: "0123456789abcdef".into(),
        };
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000);
        let s = token_secret("mywasipool", &token, expires)
            .unwrap_or_else(|e| panic!("{}", crate::chain(&e)));
        assert_eq!(s.metadata.name.as_deref(), Some("bootstrap-token-abc123"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("kube-system"));
        assert_eq!(s.type_.as_deref(), Some("bootstrap.kubernetes.io/token"));
        // `nodepool delete` finds the pool's tokens by this label.
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(TOKEN_POOL_LABEL).map(String::as_str),
            Some("mywasipool")
        );
        let data = s.string_data.clone().unwrap_or_default();
        let get = |k: &str| data.get(k).map(String::as_str);
        assert_eq!(get("token-id"), Some("abc123"));
        assert_eq!(get("token-secret"), Some("0123456789abcdef"));
        assert_eq!(get("expiration"), Some("2030-01-01T00:00:00Z"));
        assert_eq!(get("usage-bootstrap-authentication"), Some("true"));
        // The API server accepts extra groups only under system:bootstrappers:.
        assert_eq!(
            get("auth-extra-groups"),
            Some("system:bootstrappers:wasinode:mywasipool")
        );
    }

    #[test]
    fn generated_tokens_look_like_kubeadms_and_stay_out_of_debug_output() {
        let a = Token::generate().unwrap_or_else(|e| panic!("{}", crate::chain(&e)));
        let b = Token::generate().unwrap_or_else(|e| panic!("{}", crate::chain(&e)));
        let text = a.to_string();
        let (id, secret) = text.split_once('.').unwrap_or_default();
        let alnum = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        };
        assert!(id.len() == 6 && alnum(id), "{text}");
        assert!(secret.len() == 16 && alnum(secret), "{text}");
        assert_ne!(a, b);
        let debug = format!("{a:?}");
        assert!(debug.contains(id) && !debug.contains(secret), "{debug}");
    }

    #[test]
    fn the_bootstrap_kubeconfig_is_private_and_replaced_whole()
    -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("bootstrap.kubeconfig");
        std::fs::write(&out, "old token, world-readable")?;
        write_private(&out, b"new")?;
        assert_eq!(std::fs::read(&out)?, b"new");
        // A file written earlier with a wider mode is replaced, not rewritten in place.
        let mode = std::fs::metadata(&out)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("bootstrap.kubeconfig")]);
        Ok(())
    }

    #[test]
    fn a_ca_file_relative_to_the_admin_kubeconfig_is_embedded()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("wasinode-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.pem"), "PEM BYTES")?;
        let admin = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443\n    certificate-authority: ca.pem\nusers:\n- name: u\n  user: {token: admin}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        )?;
        let out = dir.join("bootstrap.kubeconfig");
        let token = Token {
            id: "abcdef".into(),
            secret: "0123456789abcdef".into(),
        };
        write_bootstrap_kubeconfig(&admin, &token, &out)?;
        let kc = kube::config::Kubeconfig::read_from(&out)?;
        let cluster = kc.clusters[0].cluster.clone().unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority, None);
        assert_eq!(
            cluster.certificate_authority_data.as_deref(),
            Some("UEVNIEJZVEVT")
        );
        let user = kc.auth_infos[0].auth_info.clone().unwrap_or_default();
        assert!(user.token.is_some());
        Ok(())
    }
}
