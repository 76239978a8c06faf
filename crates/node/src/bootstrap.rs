//! TLS bootstrap: with a bootstrap kubeconfig (a token in `system:bootstrappers`), request the
//! node's client certificate by CSR (`kubernetes.io/kube-apiserver-client-kubelet`, subject
//! `system:node:<name>` / `system:nodes`), wait for it with a timeout, and write a kubeconfig
//! that acts as that node from then on. Before the certificate expires (at a jittered 70–90%
//! of its lifetime, as the kubelet does) a new one is requested with the node's own identity,
//! the kubeconfig is replaced atomically and the agent's client switches to it in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

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
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The server and CA of a kubeconfig's current context, as kubeconfig `cluster` fields.
pub fn cluster_of(bootstrap: &kube::config::Kubeconfig) -> anyhow::Result<serde_json::Value> {
    let ctx_name = bootstrap
        .current_context
        .clone()
        .context("the kubeconfig has no current-context")?;
    let ctx = bootstrap
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.clone())
        .with_context(|| format!("context {ctx_name:?} missing from the kubeconfig"))?;
    let cluster = bootstrap
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.clone())
        .with_context(|| format!("cluster {:?} missing from the kubeconfig", ctx.cluster))?;
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
    write_kubeconfig(kubeconfig, &cluster, node_name, &cert, &key_pem)?;
    tracing::info!(kubeconfig = %kubeconfig.display(), "node kubeconfig written");
    Ok(())
}

/// Writes a kubeconfig acting as `system:node:<node_name>` with an embedded client certificate
/// and key: to a temporary file (mode 0600) first, then renamed over `kubeconfig`, so that a
/// reader never sees half a file.
fn write_kubeconfig(
    kubeconfig: &Path,
    cluster: &serde_json::Value,
    node_name: &str,
    cert: &[u8],
    key_pem: &str,
) -> anyhow::Result<()> {
    let user = format!("system:node:{node_name}");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {
            "client-certificate-data": base64(cert),
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
    Ok(())
}

/// Standard base64 with line breaks and spaces allowed (as kubeconfig data may be wrapped).
fn unbase64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let compact: String = text.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

/// When a certificate (PEM) starts and stops being valid, and its subject's common name.
pub fn cert_validity(pem: &[u8]) -> anyhow::Result<(SystemTime, SystemTime, String)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
        cn,
    ))
}

/// The client certificate (PEM) embedded in a kubeconfig's current user, if it has one.
pub fn kubeconfig_client_cert(kubeconfig: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let user = kc
        .current_context
        .as_ref()
        .and_then(|name| kc.contexts.iter().find(|c| &c.name == name))
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone());
    let Some(auth) = kc
        .auth_infos
        .iter()
        .find(|a| Some(&a.name) == user.as_ref())
        .and_then(|a| a.auth_info.as_ref())
    else {
        return Ok(None);
    };
    if let Some(data) = &auth.client_certificate_data {
        return Ok(unbase64(data));
    }
    Ok(None)
}

/// Whether the kubeconfig's embedded client certificate has expired (false when it has none).
pub fn client_cert_expired(kubeconfig: &Path) -> bool {
    match kubeconfig_client_cert(kubeconfig) {
        Ok(Some(pem)) => {
            cert_validity(&pem).is_ok_and(|(_, not_after, _)| not_after <= SystemTime::now())
        }
        _ => false,
    }
}

/// A number in [0, 1) that differs between calls and processes.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// When to renew a certificate valid from `not_before` to `not_after`: as the kubelet, at
/// 70% + `jitter` × 20% of its lifetime (`jitter` in [0, 1)).
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime.mul_f64(0.7 + 0.2 * jitter.clamp(0.0, 1.0))
}

/// How long to wait before renewing a certificate valid from `not_before` to `not_after`:
/// `renew_after` if given (the hidden `--cert-renew-after`, for tests), else until a jittered
/// [`renewal_time`].
pub fn renewal_delay(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_after: Option<Duration>,
) -> Duration {
    if let Some(d) = renew_after {
        return d;
    }
    renewal_time(not_before, not_after, jitter())
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

/// A `kube::Client` whose identity can be replaced while every clone of it stays in use: the
/// client [`swappable`] returns sends each request through the client currently in the slot.
/// Requests in flight (and watches) finish on the connection they started on; new ones use
/// the new identity.
#[derive(Clone)]
pub struct ClientSlot(Arc<RwLock<kube::Client>>);

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSlot")
    }
}

impl ClientSlot {
    pub fn current(&self) -> kube::Client {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, client: kube::Client) {
        match self.0.write() {
            Ok(mut c) => *c = client,
            Err(p) => *p.into_inner() = client,
        }
    }
}

/// Requests to the API server in flight at once, per agent. kube's client speaks HTTP/1.1, one
/// connection per request in flight, and a wave of pods (ten thousand deleted at once) would
/// otherwise open a connection for each: 1,002 sockets were still open 30 s after such a wave in
/// bench/run node. Beyond the bound a request waits its turn (first come, first served); the
/// permit is held until the response's head arrives, so a watch holds none while it streams.
pub const MAX_API_REQUESTS_IN_FLIGHT: usize = 64;

/// Wraps `inner` into a client whose identity [`ClientSlot::set`] can replace, with at most
/// [`MAX_API_REQUESTS_IN_FLIGHT`] requests in flight.
pub fn swappable(inner: kube::Client) -> (kube::Client, ClientSlot) {
    let default_ns = inner.default_namespace().to_string();
    let slot = ClientSlot(Arc::new(RwLock::new(inner)));
    let current = slot.clone();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_API_REQUESTS_IN_FLIGHT));
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let client = current.current();
        let permits = permits.clone();
        async move {
            // The semaphore is never closed, so this always gets a permit.
            let _permit = permits.acquire_owned().await.ok();
            client.send(req).await
        }
    });
    (kube::Client::new(service, default_ns), slot)
}

/// What the agent needs to keep its client certificate fresh.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The node's kubeconfig (embedded certificate and key), rewritten on each renewal.
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// The slot of the agent's client, switched to the new certificate.
    pub slot: ClientSlot,
    /// Renew this long after the certificate was loaded instead of at 70–90% of its lifetime.
    pub renew_after: Option<Duration>,
    /// Longest wait for a renewal CSR to be issued.
    pub timeout: Duration,
    /// When the certificate has expired before it could be renewed (the machine slept, the
    /// API server was away), the node's identity is gone: bootstrap again with this.
    pub bootstrap_kubeconfig: Option<PathBuf>,
}

/// Obtains a new client certificate with the node's current identity, writes it to the
/// kubeconfig and switches the agent's client to it.
pub async fn renew_client_cert(r: &Renewal) -> anyhow::Result<()> {
    let kc = kube::config::Kubeconfig::read_from(&r.kubeconfig)
        .with_context(|| format!("reading {}", r.kubeconfig.display()))?;
    let cluster = cluster_of(&kc)?;
    let (csr_pem, key_pem) = client_csr(&r.node_name)?;
    let cert = request_certificate(
        r.slot.current(),
        CLIENT_SIGNER,
        &["digital signature", "client auth"],
        &csr_pem,
        &format!("node-csr-{}-", r.node_name),
        Some(r.timeout),
    )
    .await?;
    cert_validity(&cert).context("the issued certificate")?;
    write_kubeconfig(&r.kubeconfig, &cluster, &r.node_name, &cert, &key_pem)?;
    let client = crate::client_from_kubeconfig(&r.kubeconfig).await?;
    r.slot.set(client);
    Ok(())
}

/// Renews the client certificate before it expires, again and again; never returns. Only a
/// kubeconfig with an embedded certificate of `system:node:<name>` (what bootstrap writes) is
/// renewed: another one is managed by whoever wrote it.
pub async fn keep_client_cert_renewed(r: Renewal) {
    let expected = format!("system:node:{}", r.node_name);
    loop {
        let validity = kubeconfig_client_cert(&r.kubeconfig).and_then(|pem| match pem {
            Some(pem) => cert_validity(&pem),
            None => anyhow::bail!("it has no embedded client certificate"),
        });
        let (not_before, not_after) = match validity {
            Ok((nb, na, cn)) if cn == expected => (nb, na),
            Ok((_, _, cn)) => {
                tracing::info!(
                    "not renewing the client certificate of {}: it is {cn:?}, not {expected:?}",
                    r.kubeconfig.display()
                );
                return;
            }
            Err(e) => {
                tracing::info!(
                    "not renewing the client certificate of {}: {e:#}",
                    r.kubeconfig.display()
                );
                return;
            }
        };
        let wait = renewal_delay(not_before, not_after, r.renew_after);
        tracing::info!(
            "client certificate valid until {}, renewing in {wait:?}",
            crate::time(not_after)
        );
        tokio::time::sleep(wait).await;
        let mut backoff = Duration::from_secs(5);
        loop {
            match renew_client_cert(&r).await {
                Ok(()) => {
                    tracing::info!(node = %r.node_name, "client certificate renewed");
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        "renewing the client certificate: {e:#}; retrying in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        }
    }
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
    fn base64_round_trips() {
        for s in [&b""[..], b"f", b"fo", b"foo", b"foobar", &[0, 255, 17, 3]] {
            assert_eq!(unbase64(&base64(s)).unwrap(), s);
        }
        assert_eq!(unbase64("Zm9v\nYmFy").unwrap(), b"foobar");
        assert_eq!(unbase64("Zm9v*"), None);
    }

    #[test]
    fn renews_between_70_and_90_percent_of_the_lifetime() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let na = nb + Duration::from_secs(1_000);
        assert_eq!(renewal_time(nb, na, 0.0), nb + Duration::from_secs(700));
        assert_eq!(renewal_time(nb, na, 0.5), nb + Duration::from_secs(800));
        assert_eq!(renewal_time(nb, na, 1.0), nb + Duration::from_secs(900));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
        // Past its renewal time: renew now. Forced: the given delay.
        assert_eq!(renewal_delay(nb, na, None), Duration::ZERO);
        assert_eq!(
            renewal_delay(nb, na, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn reads_validity_and_subject() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "system:node:n1");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).unwrap();
        let (nb, na, cn) = cert_validity(cert.pem().as_bytes()).unwrap();
        assert_eq!(cn, "system:node:n1");
        assert!(nb < na);
        assert!(cert_validity(b"nonsense").is_err());
    }

    #[test]
    fn an_expired_client_certificate_is_noticed() {
        let dir = std::env::temp_dir().join(format!("wasinode-bootstrap-{}", std::process::id()));
        let cluster = json!({"server": "https://127.0.0.1:6443"});
        for (year, expired) in [(2001, true), (2999, false)] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(year, 1, 1);
            let cert = params.self_signed(&key).unwrap();
            let path = dir.join(format!("{year}.kubeconfig"));
            write_kubeconfig(
                &path,
                &cluster,
                "n1",
                cert.pem().as_bytes(),
                &key.serialize_pem(),
            )
            .unwrap();
            assert_eq!(client_cert_expired(&path), expired, "{year}");
            let pem = kubeconfig_client_cert(&path).unwrap().unwrap();
            assert_eq!(pem, cert.pem().as_bytes());
        }
        assert!(!client_cert_expired(&dir.join("missing.kubeconfig")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn csr_names_the_node() {
        let (csr, key) = client_csr("n1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(key.contains("PRIVATE KEY"));
    }
}
