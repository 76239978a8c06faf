//! Container logs: one file per container under the data dir, in the CRI log format the kubelet
//! uses (`<RFC3339 nanos> <stream> F <line>`), so the node agent can serve `kubectl logs` with
//! timestamps, since-time and tail. Writing is buffered by one background task: a guest's line
//! costs the request path one channel send.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::plan::PodKey;

enum Msg {
    Line {
        path: Arc<PathBuf>,
        prefix: Option<Arc<str>>,
        stream: &'static str,
        at: SystemTime,
        line: Vec<u8>,
    },
    Close(Arc<PathBuf>),
    Flush(oneshot::Sender<()>),
}

/// The log files of every container of this process.
#[derive(Clone)]
pub struct LogStore {
    root: PathBuf,
    tx: mpsc::UnboundedSender<Msg>,
    echo: bool,
}

impl LogStore {
    /// Starts the writer task (needs a Tokio runtime). With `echo`, every line is also printed to
    /// this process's stderr as `[namespace/pod/container] line`.
    pub fn start(root: PathBuf, echo: bool) -> LogStore {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(rx));
        LogStore { root, tx, echo }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of one pod's logs.
    pub fn pod_dir(&self, pod: &PodKey) -> PathBuf {
        self.root
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
    }

    /// The current log file of a container.
    pub fn path(&self, pod: &PodKey, container: &str) -> PathBuf {
        self.pod_dir(pod).join(format!("{container}.log"))
    }

    /// The log of the container's previous run (after a restart).
    pub fn previous_path(&self, pod: &PodKey, container: &str) -> PathBuf {
        self.pod_dir(pod).join(format!("{container}.log.previous"))
    }

    pub fn container(&self, pod: &PodKey, container: &str) -> ContainerLog {
        let prefix = self
            .echo
            .then(|| Arc::from(format!("[{}/{}/{}] ", pod.namespace, pod.name, container)));
        ContainerLog {
            path: Arc::new(self.path(pod, container)),
            prefix,
            tx: self.tx.clone(),
            stream: "stderr",
        }
    }

    /// Waits until every line sent so far is on disk.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Starts a new run of a container: the current log becomes the previous one.
    pub async fn rotate(&self, pod: &PodKey, container: &str) {
        let current = Arc::new(self.path(pod, container));
        let _ = self.tx.send(Msg::Close(current.clone()));
        self.flush().await;
        let _ = tokio::fs::rename(&*current, self.previous_path(pod, container)).await;
    }

    /// Removes a deleted pod's logs.
    pub async fn remove_pod(&self, pod: &PodKey) {
        self.flush().await;
        let _ = tokio::fs::remove_dir_all(self.pod_dir(pod)).await;
    }
}

/// The log of one container; a `runtime::LineSink`.
#[derive(Clone)]
pub struct ContainerLog {
    path: Arc<PathBuf>,
    prefix: Option<Arc<str>>,
    tx: mpsc::UnboundedSender<Msg>,
    stream: &'static str,
}

impl ContainerLog {
    /// The same log, marking lines as written to stdout.
    pub fn stdout(&self) -> ContainerLog {
        ContainerLog {
            stream: "stdout",
            ..self.clone()
        }
    }

    /// A line the runtime itself writes into the container's log (why a request failed, ...).
    pub fn note(&self, text: &str) {
        self.line(text.as_bytes());
    }

    /// Each line of `bytes`, as written by the guest.
    pub fn lines(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        for line in text.split(|b| *b == b'\n') {
            self.line(line.strip_suffix(b"\r").unwrap_or(line));
        }
    }
}

impl runtime::LineSink for ContainerLog {
    fn line(&self, line: &[u8]) {
        let _ = self.tx.send(Msg::Line {
            path: self.path.clone(),
            prefix: self.prefix.clone(),
            stream: self.stream,
            at: SystemTime::now(),
            line: line.to_vec(),
        });
    }
}

use runtime::LineSink as _;

async fn writer(mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut files: HashMap<Arc<PathBuf>, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut dirty = false;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                match msg {
                    Msg::Line { path, prefix, stream, at, line } => {
                        if let Some(p) = prefix {
                            let mut err = std::io::stderr().lock();
                            let _ = err.write_all(p.as_bytes());
                            let _ = err.write_all(&line);
                            let _ = err.write_all(b"\n");
                        }
                        let f = match files.get_mut(&path) {
                            Some(f) => f,
                            None => match open(&path) {
                                Ok(f) => files.entry(path.clone()).or_insert(f),
                                Err(e) => {
                                    tracing::warn!(path = %path.display(), error = %e, "cannot open container log");
                                    continue;
                                }
                            },
                        };
                        let stamp = humantime::format_rfc3339_nanos(at);
                        let _ = write!(f, "{stamp} {stream} F ");
                        let _ = f.write_all(&line);
                        let _ = f.write_all(b"\n");
                        dirty = true;
                    }
                    Msg::Close(path) => {
                        if let Some(mut f) = files.remove(&path) {
                            let _ = f.flush();
                        }
                    }
                    Msg::Flush(done) => {
                        for f in files.values_mut() {
                            let _ = f.flush();
                        }
                        dirty = false;
                        let _ = done.send(());
                    }
                }
            }
            _ = tick.tick(), if dirty => {
                for f in files.values_mut() {
                    let _ = f.flush();
                }
                dirty = false;
            }
        }
    }
    for f in files.values_mut() {
        let _ = f.flush();
    }
}

fn open(path: &Path) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(std::io::BufWriter::with_capacity(64 << 10, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_land_in_cri_format_and_rotate() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start(dir.path().to_path_buf(), false);
        let pod = PodKey {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        let log = store.container(&pod, "c");
        log.lines(b"one\ntwo\r\n");
        log.stdout().note("three");
        store.flush().await;
        let text = std::fs::read_to_string(store.path(&pod, "c")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with(" stderr F one"), "{}", lines[0]);
        assert!(lines[2].ends_with(" stdout F three"), "{}", lines[2]);
        assert!(humantime::parse_rfc3339(lines[0].split(' ').next().unwrap_or("")).is_ok());
        store.rotate(&pod, "c").await;
        log.note("four");
        store.flush().await;
        assert_eq!(
            std::fs::read_to_string(store.path(&pod, "c"))
                .unwrap_or_default()
                .lines()
                .count(),
            1
        );
        assert_eq!(
            std::fs::read_to_string(store.previous_path(&pod, "c"))
                .unwrap_or_default()
                .lines()
                .count(),
            3
        );
    }
}
