//! TLS bootstrap: with a bootstrap kubeconfig (a token in `system:bootstrappers`), request the
//! node's client certificate by CSR (`kubernetes.io/kube-apiserver-client-kubelet`, subject
//! `system:node:<name>` / `system:nodes`), wait for it with a timeout, and write a kubeconfig
//! that acts as that node from then on. Renewal before expiry is not done yet.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use serde_json::json;

pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

/// A new P-256 key and a PEM CSR for `system:node:<node_name>` in `system:nodes`.
pub fn client_csr(node_name: &str) -> anyhow::Result<(String, String)> {
    node_csr(node_name, &[], &[])
}

/// A new P-256 key and a PEM CSR for the node, with DNS and IP subject alternative names (for
/// a `kubelet-serving` certificate).
pub fn node_csr(
    node_name: &str,
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let mut params = rcgen::CertificateParams::new(dns.to_vec())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        format!("system:node:{node_name}"),
    );
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .context("building the CSR")?
        .pem()
        .context("encoding the CSR")?;
    Ok((csr, key.serialize_pem()))
}

/// Creates a CSR for `signer` and waits (at most `timeout`, if given) until it is issued;
/// returns the certificate PEM. Fails hard on denial, failure or timeout.
pub async fn request_certificate(
    client: kube::Client,
    signer: &str,
    usages: &[&str],
    csr_pem: &str,
    name_prefix: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<Vec<u8>> {
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    let obj: CertificateSigningRequest = serde_json::from_value(json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"generateName": name_prefix},
        "spec": {
            "request": base64(csr_pem.as_bytes()),
            "signerName": signer,
            "usages": usages,
        },
    }))?;
    let created = csrs
        .create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating a {signer} CSR"))?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, signer, "waiting for the certificate");
    let started = Instant::now();
    loop {
        match csrs.get(&name).await {
            Ok(c) => {
                let status = c.status.unwrap_or_default();
                for cond in status.conditions.unwrap_or_default() {
                    if (cond.type_ == "Denied" || cond.type_ == "Failed") && cond.status == "True" {
                        bail!(
                            "CSR {name} was {}: {} {}",
                            cond.type_.to_lowercase(),
                            cond.reason.unwrap_or_default(),
                            cond.message.unwrap_or_default()
                        );
                    }
                }
                if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                    tracing::info!(csr = %name, "certificate issued");
                    return Ok(cert.0);
                }
            }
            Err(e) => tracing::warn!(csr = %name, "reading CSR: {e}"),
        }
        if let Some(t) = timeout
            && started.elapsed() >= t
        {
            bail!(
                "CSR {name} not issued within {t:?} (is the csrapproving controller running, \
                 or must an admin run `kubectl certificate approve {name}`?)"
            );
        }
        let wait = if started.elapsed() < Duration::from_secs(10) {
            250
        } else {
            2000
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The server and CA of the bootstrap kubeconfig's current context, as kubeconfig fields.
fn cluster_of(bootstrap: &kube::config::Kubeconfig) -> anyhow::Result<serde_json::Value> {
    let ctx_name = bootstrap
        .current_context
        .clone()
        .context("the bootstrap kubeconfig has no current-context")?;
    let ctx = bootstrap
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.clone())
        .with_context(|| format!("context {ctx_name:?} missing from the bootstrap kubeconfig"))?;
    let cluster = bootstrap
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.clone())
        .with_context(|| {
            format!(
                "cluster {:?} missing from the bootstrap kubeconfig",
                ctx.cluster
            )
        })?;
    let mut out = json!({"server": cluster.server});
    if let Some(ca) = cluster.certificate_authority_data {
        out["certificate-authority-data"] = json!(ca);
    } else if let Some(ca) = cluster.certificate_authority {
        out["certificate-authority"] = json!(ca);
    }
    if cluster.insecure_skip_tls_verify == Some(true) {
        out["insecure-skip-tls-verify"] = json!(true);
    }
    Ok(out)
}

/// Obtains the node's client certificate with `bootstrap_kubeconfig` and writes a kubeconfig
/// acting as `system:node:<node_name>` to `kubeconfig` (mode 0600). Fails if the certificate is
/// denied or not issued within `timeout`; never writes an empty certificate.
pub async fn bootstrap(
    bootstrap_kubeconfig: &Path,
    kubeconfig: &Path,
    node_name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let kc = kube::config::Kubeconfig::read_from(bootstrap_kubeconfig)
        .with_context(|| format!("reading {}", bootstrap_kubeconfig.display()))?;
    let cluster = cluster_of(&kc)?;
    let client = crate::client_from_kubeconfig(bootstrap_kubeconfig).await?;
    let (csr_pem, key_pem) = client_csr(node_name)?;
    let cert = request_certificate(
        client,
        CLIENT_SIGNER,
        &["digital signature", "client auth"],
        &csr_pem,
        &format!("node-csr-{node_name}-"),
        Some(timeout),
    )
    .await?;
    let user = format!("system:node:{node_name}");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {
            "client-certificate-data": base64(&cert),
            "client-key-data": base64(key_pem.as_bytes()),
        }}],
        "contexts": [{"name": "default-context", "context": {"cluster": "default-cluster", "user": user}}],
        "current-context": "default-context",
    });
    if let Some(dir) = kubeconfig.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = kubeconfig.with_extension("tmp");
    {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        opts.mode(0o600);
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(&config)?.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    tracing::info!(kubeconfig = %kubeconfig.display(), "node kubeconfig written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn csr_names_the_node() {
        let (csr, key) = client_csr("n1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(key.contains("PRIVATE KEY"));
    }
}
