//! How a pool's agents join: a bootstrap token (as `kubeadm token create` makes one), the RBAC
//! bindings that let `system:bootstrappers` request node client certificates and have them
//! auto-approved, and the bootstrap kubeconfig the agents start with.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

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
pub async fn ensure_bindings(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
    for (name, role, group) in BINDINGS {
        let crb: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }))?;
        match api.create(&PostParams::default(), &crb).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
                "no permission to create the node bootstrap ClusterRoleBinding {name}; use a cluster admin's kubeconfig"
            ),
            Err(e) => return Err(e).with_context(|| format!("creating ClusterRoleBinding {name}")),
        }
    }
    Ok(())
}

fn random_chars(n: usize) -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom for a bootstrap token")?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

/// Creates a bootstrap token Secret for `pool` in kube-system and returns `id.secret`.
pub async fn create_token(client: &kube::Client, pool: &str) -> anyhow::Result<String> {
    let (id, secret) = (random_chars(6)?, random_chars(16)?);
    let expires = SystemTime::now() + TOKEN_TTL;
    let expires = k8s_openapi::jiff::Timestamp::try_from(expires)
        .context("token expiry")?
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": format!("bootstrap-token-{id}"),
            "namespace": "kube-system",
            "labels": {TOKEN_POOL_LABEL: pool},
        },
        "type": "bootstrap.kubernetes.io/token",
        "stringData": {
            "description": format!("wasinode node pool {pool}"),
            "token-id": id,
            "token-secret": secret,
            "expiration": expires,
            "usage-bootstrap-authentication": "true",
            "usage-bootstrap-signing": "true",
            "auth-extra-groups": format!("system:bootstrappers:wasinode:{pool}"),
        },
    }))?;
    let api: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    match api.create(&PostParams::default(), &s).await {
        Ok(_) => Ok(format!("{id}.{secret}")),
        Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
            "no permission to create a bootstrap token Secret in kube-system; use a cluster admin's kubeconfig"
        ),
        Err(e) => Err(e).context("creating the bootstrap token"),
    }
}

/// Deletes the bootstrap tokens `pool` created.
pub async fn delete_tokens(client: &kube::Client, pool: &str) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let lp = ListParams::default().labels(&format!("{TOKEN_POOL_LABEL}={pool}"));
    for s in api.list(&lp).await.context("listing bootstrap tokens")? {
        if let Some(name) = s.metadata.name {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e).context("deleting a bootstrap token"),
            }
        }
    }
    Ok(())
}

/// Writes a kubeconfig for the cluster of `admin` (its current context) that authenticates with
/// `token`, mode 0600.
pub fn write_bootstrap_kubeconfig(admin: &Path, token: &str, out: &Path) -> anyhow::Result<()> {
    let kc = kube::config::Kubeconfig::read_from(admin)
        .with_context(|| format!("reading kubeconfig {}", admin.display()))?;
    let mut cluster_entry = node::bootstrap::cluster_of(&kc)?;
    // The agents read the bootstrap kubeconfig from elsewhere: embed a CA given as a file.
    if let Some(file) = cluster_entry
        .get("certificate-authority")
        .and_then(|f| f.as_str())
        .map(str::to_string)
    {
        let file = admin.parent().unwrap_or(Path::new(".")).join(file);
        let pem = std::fs::read(&file)
            .with_context(|| format!("reading the cluster CA {}", file.display()))?;
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
        "users": [{"name": "bootstrap", "user": {"token": token}}],
        "contexts": [{"name": "bootstrap", "context": {"cluster": "cluster", "user": "bootstrap"}}],
        "current-context": "bootstrap",
    });
    let text = serde_yaml::to_string(&doc)?;
    write_private(out, text.as_bytes())
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_relative_to_the_admin_kubeconfig_is_embedded() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("wasinode-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.pem"), "PEM BYTES")?;
        let admin = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443\n    certificate-authority: ca.pem\nusers:\n- name: u\n  user: {token: admin}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        )?;
        let out = dir.join("bootstrap.kubeconfig");
        write_bootstrap_kubeconfig(&admin, "abcdef.0123456789abcdef", &out)?;
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
