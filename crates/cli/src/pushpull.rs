//! `wasinode push FILE REF` and `wasinode pull REF`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Publish a module as an OCI artifact (CNCF wasm layout) and print its manifest digest.
#[derive(clap::Args, Debug, Clone)]
pub struct PushArgs {
    /// The module: a .wasm binary (or .wat text, assembled first).
    pub file: PathBuf,
    /// Where to publish: HOST[:PORT]/REPOSITORY[:TAG] (Docker Hub short names work too).
    pub reference: String,
    /// Reach this registry over plain HTTP (HOST[:PORT]; a bare HOST matches any
    /// port). Loopback registries always are. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Data directory (the module store is DIR/oci). Default: $WASINODE_DATA_DIR,
    /// else $XDG_DATA_HOME/wasinode, else ~/.local/share/wasinode.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Fetch a module into the local store and print its manifest digest.
#[derive(clap::Args, Debug, Clone)]
pub struct PullArgs {
    /// HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST] (Docker Hub short names work too).
    pub reference: String,
    /// Reach this registry over plain HTTP (HOST[:PORT]; a bare HOST matches any
    /// port). Loopback registries always are. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Data directory (the module store is DIR/oci). Default: $WASINODE_DATA_DIR,
    /// else $XDG_DATA_HOME/wasinode, else ~/.local/share/wasinode.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Always, IfNotPresent or Never. Default as Kubernetes: Always for :latest
    /// or no tag, IfNotPresent otherwise.
    #[arg(long, value_name = "POLICY")]
    pub policy: Option<String>,
}

fn registry_ref(s: &str) -> anyhow::Result<oci::Reference> {
    match oci::ImageRef::parse(s)? {
        oci::ImageRef::Registry(r) => Ok(r),
        oci::ImageRef::Local(p) => anyhow::bail!(
            "{s:?} is a local file ({}); push and pull take a registry reference HOST[:PORT]/REPOSITORY[:TAG]",
            p.display()
        ),
    }
}

fn client(data_dir: Option<PathBuf>, insecure: Vec<String>) -> anyhow::Result<oci::Client> {
    let data_dir = data_dir.unwrap_or_else(oci::default_data_dir);
    let store = oci::Store::open(&data_dir)?;
    let creds = oci::Credentials::from_docker_config_env()?;
    Ok(oci::Client::new(store, creds, insecure))
}

/// `wasinode push FILE REF`: prints the manifest digest on stdout.
pub async fn push(a: PushArgs) -> anyhow::Result<()> {
    let r = registry_ref(&a.reference)?;
    let client = client(a.data_dir, a.insecure_registry)?;
    let progress = TermProgress::new();
    // The error names the reference (or the file) and the cause.
    let digest = client.push(&a.file, &r, &progress).await?;
    progress.finish(&format!("pushed {r}"));
    println!("{digest}");
    Ok(())
}

/// `wasinode pull REF`: prints the manifest digest on stdout.
pub async fn pull(a: PullArgs) -> anyhow::Result<()> {
    let r = registry_ref(&a.reference)?;
    let policy = oci::PullPolicy::parse(a.policy.as_deref(), &r)?;
    let client = client(a.data_dir, a.insecure_registry)?;
    let progress = TermProgress::new();
    let pulled = client
        .pull_with_progress(&r, policy, None, &progress)
        .await?;
    progress.finish(&format!(
        "pulled {r}: module {} ({} bytes) at {}",
        pulled.layer_digest,
        pulled.size,
        pulled.path.display()
    ));
    println!("{}", pulled.manifest_digest);
    Ok(())
}

/// A one-line progress display on stderr, only when stderr is a terminal.
struct TermProgress {
    on: bool,
    state: Mutex<(Instant, String)>,
}

impl TermProgress {
    fn new() -> Self {
        TermProgress {
            on: std::io::stderr().is_terminal(),
            state: Mutex::new((Instant::now(), String::new())),
        }
    }

    fn line(&self, s: &str) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{s}");
        let _ = err.flush();
    }

    fn finish(&self, s: &str) {
        if self.on {
            self.line(s);
            eprintln!();
        }
    }
}

impl oci::Progress for TermProgress {
    fn message(&self, m: &str) {
        if !self.on {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            st.1 = m.to_string();
        }
        self.line(m);
    }

    fn bytes(&self, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if done < total && st.0.elapsed() < Duration::from_millis(100) {
            return;
        }
        st.0 = Instant::now();
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let width = 30usize;
        let filled = (pct as usize * width / 100).min(width);
        let msg = st.1.clone();
        drop(st);
        self.line(&format!(
            "{msg} [{}{}] {} / {} ({pct}%)",
            "#".repeat(filled),
            "-".repeat(width - filled),
            human(done),
            human(total)
        ));
    }
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}
