//! Container logs: one file per container under the data dir, in the CRI log format the kubelet
//! uses (`<RFC3339 nanos> <stream> F <line>`), so the node agent can serve `kubectl logs` with
//! timestamps, since-time and tail.
//!
//! **Files.** `<root>/<namespace>_<pod>_<uid>/<container>.log` is the current file. When writing
//! a line would make it larger than [`LogConfig::max_size`], it is renamed to
//! `<container>.log.<UTC YYYYMMDD-HHMMSS.nnnnnnnnn>` (the kubelet's `<name>.log.<timestamp>`,
//! with nanoseconds so that several rotations in one second keep their order; the names sort
//! oldest first) and a new current file is started; the oldest rotated files beyond
//! [`LogConfig::max_files`] (the current file included) are deleted. When a container restarts,
//! its current file becomes `<container>.log.previous` and its rotated files
//! `<container>.log.previous.<timestamp>` (what `kubectl logs --previous` reads), replacing
//! the run before; so a container's logs take at most `2 × max_files × max_size` (plus one line
//! per file). A file is only opened while lines come: it is closed after
//! [`LogConfig::idle_close`] without any, so pods at rest hold no descriptor. A deleted pod's
//! files are closed and removed, and lines its containers write afterwards are dropped.
//!
//! **The path from a guest to the file is bounded.** A line costs the guest a lock of its own
//! container's buffer and a copy into it; nothing blocks. Each container may have at most
//! [`LogConfig::container_buffer`] bytes waiting, and all together
//! [`LogConfig::total_buffer`]: a line beyond that is dropped and counted for its container, and
//! when the writer next writes that container's lines it adds
//! `wasinode: N lines dropped (log writer behind)`. So a guest printing in a tight loop loses its
//! own lines, not other pods'. One writer thread (not a Tokio worker) takes the containers with
//! lines waiting in the order they became ready, one batch each, writes each batch with one
//! `write(2)` and rotates files.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use crate::plan::PodKey;

/// How container logs are kept.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Also print every line to this process's stderr as `[namespace/pod/container] line`.
    pub echo: bool,
    /// A log file is rotated before it grows past this many bytes (the kubelet's
    /// `--container-log-max-size`, 10Mi by default). A single line longer than this gets a file
    /// of its own.
    pub max_size: u64,
    /// Files kept per container run, the current one included (the kubelet's
    /// `--container-log-max-files`, 5 by default; at least 1).
    pub max_files: usize,
    /// A log file is closed after this long without a line.
    pub idle_close: Duration,
    /// Bytes one container may have waiting for the writer; beyond it its lines are dropped.
    pub container_buffer: usize,
    /// Bytes all containers together may have waiting for the writer.
    pub total_buffer: usize,
    /// Testing only: the writer writes at most this many bytes per second (as a slow disk
    /// would), so that tests can see what happens when it falls behind.
    pub write_rate: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            echo: false,
            max_size: 10 << 20,
            max_files: 5,
            idle_close: Duration::from_secs(5),
            container_buffer: 1 << 20,
            total_buffer: 32 << 20,
            write_rate: None,
        }
    }
}

/// What a line costs besides its text: the stamp, the stream and tag, the newline.
const LINE_OVERHEAD: usize = 48;

/// How long the writer sleeps between looks at its open files when nothing comes.
const SWEEP: Duration = Duration::from_secs(1);

/// The log files of every container of this process.
#[derive(Clone)]
pub struct LogStore {
    root: PathBuf,
    shared: Arc<Shared>,
    _stop: Arc<StopOnDrop>,
}

struct Shared {
    cfg: LogConfig,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Bytes waiting in every container's buffer.
    queued: AtomicUsize,
    /// The container logs handed out, by current file path.
    sinks: Mutex<BTreeMap<PathBuf, Arc<Sink>>>,
}

#[derive(Default)]
struct Queue {
    /// Containers with lines (or a drop count) waiting; each at most once.
    ready: VecDeque<Arc<Sink>>,
    control: VecDeque<Control>,
    stopped: bool,
}

enum Control {
    Flush(oneshot::Sender<()>),
    /// A container starts a new run: its current files become the previous run's.
    Restart(PathBuf, oneshot::Sender<()>),
    /// Close and remove a pod's folder (its sinks are already closed).
    RemovePod(PathBuf, oneshot::Sender<()>),
    #[cfg(test)]
    Run(Box<dyn FnOnce() + Send>),
}

/// One container's log file and the lines waiting for it.
struct Sink {
    path: PathBuf,
    prefix: Option<Box<str>>,
    pending: Mutex<Pending>,
    /// Lines dropped since the container's log was opened (for metrics).
    dropped_total: AtomicU64,
}

#[derive(Default)]
struct Pending {
    data: Vec<u8>,
    dropped: u64,
    /// In the ready queue (or being written).
    scheduled: bool,
    /// The pod was removed: lines are dropped without a count.
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        lock(&self.0.queue).stopped = true;
        self.0.wake.notify_one();
    }
}

impl Shared {
    fn control(&self, c: Control) {
        lock(&self.queue).control.push_back(c);
        self.wake.notify_one();
    }

    async fn call(&self, make: impl FnOnce(oneshot::Sender<()>) -> Control) {
        let (tx, rx) = oneshot::channel();
        self.control(make(tx));
        let _ = rx.await;
    }
}

impl LogStore {
    /// Starts the writer thread with the default limits. With `echo`, every line is also printed
    /// to this process's stderr as `[namespace/pod/container] line`.
    pub fn start(root: PathBuf, echo: bool) -> LogStore {
        LogStore::start_with(
            root,
            LogConfig {
                echo,
                ..LogConfig::default()
            },
        )
    }

    /// Starts the writer thread with `cfg`.
    pub fn start_with(root: PathBuf, mut cfg: LogConfig) -> LogStore {
        cfg.max_files = cfg.max_files.max(1);
        cfg.max_size = cfg.max_size.max(1);
        let shared = Arc::new(Shared {
            cfg,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            queued: AtomicUsize::new(0),
            sinks: Mutex::new(BTreeMap::new()),
        });
        let writer = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("container-logs".into())
            .spawn(move || Writer::new(writer).run());
        if let Err(e) = spawned {
            // Lines then stay within the buffer bounds and are dropped beyond them.
            tracing::error!("cannot start the container log writer: {e}");
        }
        LogStore {
            root,
            _stop: Arc::new(StopOnDrop(shared.clone())),
            shared,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.cfg
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
        let path = self.path(pod, container);
        let sink =
            lock(&self.shared.sinks)
                .entry(path.clone())
                .or_insert_with(|| {
                    Arc::new(Sink {
                        path,
                        prefix: self.shared.cfg.echo.then(|| {
                            format!("[{}/{}/{}] ", pod.namespace, pod.name, container).into()
                        }),
                        pending: Mutex::new(Pending::default()),
                        dropped_total: AtomicU64::new(0),
                    })
                })
                .clone();
        ContainerLog {
            sink,
            shared: self.shared.clone(),
            stream: "stderr",
        }
    }

    /// Waits until every line sent so far is written.
    pub async fn flush(&self) {
        self.shared.call(Control::Flush).await;
    }

    /// Starts a new run of a container: the current log becomes the previous one.
    pub async fn rotate(&self, pod: &PodKey, container: &str) {
        let path = self.path(pod, container);
        self.shared.call(|tx| Control::Restart(path, tx)).await;
    }

    /// Removes a deleted pod's logs: its files are closed and deleted, and lines its containers
    /// write from now on are dropped.
    pub async fn remove_pod(&self, pod: &PodKey) {
        let dir = self.pod_dir(pod);
        // A pod's sinks are keyed by paths inside its folder, which sort together right after
        // it: a range, not a pass over every container of the node.
        let gone: Vec<Arc<Sink>> = {
            let mut sinks = lock(&self.shared.sinks);
            let keys: Vec<PathBuf> = sinks
                .range(dir.clone()..)
                .take_while(|(k, _)| k.starts_with(&dir))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| sinks.remove(k)).collect()
        };
        for s in gone {
            let mut p = lock(&s.pending);
            p.closed = true;
            self.shared
                .queued
                .fetch_sub(p.data.len(), Ordering::Relaxed);
            p.data = Vec::new();
            p.dropped = 0;
        }
        self.shared.call(|tx| Control::RemovePod(dir, tx)).await;
    }

    /// Lines of a container's log dropped because the writer was behind, if its log is open.
    pub fn lines_dropped(&self, pod: &PodKey, container: &str) -> Option<u64> {
        let path = self.path(pod, container);
        let sinks = lock(&self.shared.sinks);
        sinks
            .get(&path)
            .map(|s| s.dropped_total.load(Ordering::Relaxed))
    }

    /// Bytes waiting for the writer (all containers).
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

/// The log of one container; a `runtime::LineSink`.
#[derive(Clone)]
pub struct ContainerLog {
    sink: Arc<Sink>,
    shared: Arc<Shared>,
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
        let cfg = &self.shared.cfg;
        let cost = line.len() + LINE_OVERHEAD;
        let at = SystemTime::now();
        let mut p = lock(&self.sink.pending);
        if p.closed {
            return;
        }
        if p.data.len() + cost > cfg.container_buffer
            || self.shared.queued.load(Ordering::Relaxed) + cost > cfg.total_buffer
        {
            p.dropped += 1;
            self.sink.dropped_total.fetch_add(1, Ordering::Relaxed);
        } else {
            let before = p.data.len();
            let stamp = humantime::format_rfc3339_nanos(at);
            let _ = write!(p.data, "{stamp} {} F ", self.stream);
            p.data.extend_from_slice(line);
            p.data.push(b'\n');
            self.shared
                .queued
                .fetch_add(p.data.len() - before, Ordering::Relaxed);
        }
        if !p.scheduled {
            p.scheduled = true;
            drop(p);
            lock(&self.shared.queue).ready.push_back(self.sink.clone());
            self.shared.wake.notify_one();
        }
    }
}

use runtime::LineSink as _;

/// An open log file.
struct Open {
    file: File,
    size: u64,
    last: Instant,
}

struct Writer {
    shared: Arc<Shared>,
    files: HashMap<PathBuf, Open>,
    last_sweep: Instant,
}

enum Job {
    Control(Control),
    Write(Arc<Sink>),
    Idle,
    Stop,
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Writer {
        Writer {
            shared,
            files: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    fn next(&self) -> Job {
        let mut q = lock(&self.shared.queue);
        loop {
            if let Some(c) = q.control.pop_front() {
                return Job::Control(c);
            }
            if let Some(s) = q.ready.pop_front() {
                return Job::Write(s);
            }
            if q.stopped {
                return Job::Stop;
            }
            if self.files.is_empty() {
                q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            } else {
                let (g, t) = self
                    .shared
                    .wake
                    .wait_timeout(q, SWEEP)
                    .unwrap_or_else(|p| p.into_inner());
                q = g;
                if t.timed_out() {
                    return Job::Idle;
                }
            }
        }
    }

    fn run(mut self) {
        loop {
            match self.next() {
                Job::Control(c) => self.control(c),
                Job::Write(s) => self.write(&s, true),
                Job::Idle => {}
                Job::Stop => break,
            }
            if self.last_sweep.elapsed() >= SWEEP {
                self.last_sweep = Instant::now();
                let idle = self.shared.cfg.idle_close;
                self.files.retain(|_, f| f.last.elapsed() < idle);
            }
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Flush(done) => {
                // Everything ready now; a container that keeps writing is taken once.
                let n = lock(&self.shared.queue).ready.len();
                for _ in 0..n {
                    let Some(s) = lock(&self.shared.queue).ready.pop_front() else {
                        break;
                    };
                    self.write(&s, true);
                }
                let _ = done.send(());
            }
            Control::Restart(path, done) => {
                let sink = lock(&self.shared.sinks).get(&path).cloned();
                if let Some(s) = sink {
                    self.write(&s, false);
                }
                self.files.remove(&path);
                if let Err(e) = start_previous(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot keep the previous container log");
                }
                let _ = done.send(());
            }
            Control::RemovePod(dir, done) => {
                self.files.retain(|p, _| !p.starts_with(&dir));
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove pod logs")
                    }
                }
                let _ = done.send(());
            }
            #[cfg(test)]
            Control::Run(f) => f(),
        }
    }

    /// Writes what one container has waiting; `popped` when taken from the ready queue.
    fn write(&mut self, sink: &Sink, popped: bool) {
        let (data, dropped) = {
            let mut p = lock(&sink.pending);
            if popped {
                p.scheduled = false;
            }
            if p.closed {
                return;
            }
            (std::mem::take(&mut p.data), std::mem::take(&mut p.dropped))
        };
        self.shared.queued.fetch_sub(data.len(), Ordering::Relaxed);
        self.append(sink, &data);
        let mut note = Vec::new();
        if dropped > 0 {
            let stamp = humantime::format_rfc3339_nanos(SystemTime::now());
            let _ = writeln!(
                note,
                "{stamp} stderr F wasinode: {dropped} lines dropped (log writer behind)"
            );
            self.append(sink, &note);
        }
        if let Some(prefix) = &sink.prefix {
            echo(prefix, &data);
            echo(prefix, &note);
        }
        if let Some(rate) = self.shared.cfg.write_rate.filter(|r| *r > 0) {
            let bytes = (data.len() + note.len()) as f64;
            std::thread::sleep(Duration::from_secs_f64(bytes / rate as f64));
        }
    }

    /// Appends complete lines to the container's file, rotating it before it would grow past
    /// `max_size`.
    fn append(&mut self, sink: &Sink, mut data: &[u8]) {
        let max = self.shared.cfg.max_size;
        while !data.is_empty() {
            let open = match self.open(&sink.path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %sink.path.display(), error = %e, "cannot open container log");
                    return;
                }
            };
            let room = max.saturating_sub(open.size) as usize;
            let cut = if data.len() <= room {
                data.len()
            } else if let Some(i) = data[..room].iter().rposition(|b| *b == b'\n') {
                i + 1
            } else if open.size == 0 {
                // One line longer than a whole file: it gets a file of its own.
                data.iter()
                    .position(|b| *b == b'\n')
                    .map_or(data.len(), |i| i + 1)
            } else {
                0
            };
            if cut > 0 {
                if let Err(e) = open.file.write_all(&data[..cut]) {
                    tracing::warn!(path = %sink.path.display(), error = %e, "cannot write container log");
                    self.files.remove(&sink.path);
                    return;
                }
                open.size += cut as u64;
                open.last = Instant::now();
                data = &data[cut..];
            }
            if !data.is_empty() {
                self.files.remove(&sink.path);
                if let Err(e) = rotate(&sink.path, self.shared.cfg.max_files) {
                    tracing::warn!(path = %sink.path.display(), error = %e, "cannot rotate container log");
                    return;
                }
            }
        }
    }

    fn open(&mut self, path: &Path) -> std::io::Result<&mut Open> {
        if !self.files.contains_key(path) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(path)?;
            let size = file.metadata()?.len();
            self.files.insert(
                path.to_path_buf(),
                Open {
                    file,
                    size,
                    last: Instant::now(),
                },
            );
        }
        self.files
            .get_mut(path)
            .ok_or_else(|| std::io::Error::other("log file vanished"))
    }
}

fn echo(prefix: &str, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut err = std::io::BufWriter::new(std::io::stderr().lock());
    for line in data.split_inclusive(|b| *b == b'\n') {
        // Skip `<stamp> <stream> <tag> `.
        let mut text = line;
        for _ in 0..3 {
            text = text
                .iter()
                .position(|b| *b == b' ')
                .map_or(&[][..], |i| &text[i + 1..]);
        }
        let _ = err.write_all(prefix.as_bytes());
        let _ = err.write_all(text);
    }
    let _ = err.flush();
}

/// `20261201-120000.123456789`: the kubelet's rotated-file timestamp with nanoseconds.
fn rotation_stamp(at: SystemTime) -> String {
    let s = humantime::format_rfc3339_nanos(at).to_string(); // 2026-12-01T12:00:00.123456789Z
    let b = s.as_bytes();
    if b.len() < 29 {
        return s;
    }
    format!(
        "{}{}{}-{}{}{}.{}",
        &s[0..4],
        &s[5..7],
        &s[8..10],
        &s[11..13],
        &s[14..16],
        &s[17..19],
        &s[20..29]
    )
}

/// The rotated files of the log file `path` (`<name>.<timestamp>`), oldest first.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut found: Vec<String> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    found.sort();
    Ok(found.into_iter().map(|n| dir.join(n)).collect())
}

/// Renames the current file to a rotated one and deletes the oldest beyond `max_files`.
fn rotate(path: &Path, max_files: usize) -> std::io::Result<()> {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(rotation_stamp(SystemTime::now()));
    match std::fs::rename(path, &name) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let rotated = rotated_files(path)?;
    let keep = max_files.saturating_sub(1);
    for old in &rotated[..rotated.len().saturating_sub(keep)] {
        remove_file(old)?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `c.log` (and its rotated files) become `c.log.previous` (and `c.log.previous.<stamp>`),
/// replacing the run before.
fn start_previous(path: &Path) -> std::io::Result<()> {
    let mut previous = path.as_os_str().to_owned();
    previous.push(".previous");
    let previous = PathBuf::from(previous);
    for old in rotated_files(&previous)? {
        remove_file(&old)?;
    }
    remove_file(&previous)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    for r in rotated_files(path)? {
        let suffix = r
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(name))
            .unwrap_or_default();
        let mut to = previous.as_os_str().to_owned();
        to.push(suffix);
        std::fs::rename(&r, &to)?;
    }
    match std::fs::rename(path, &previous) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodKey {
        PodKey {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The text of every line in `path`'s rotated files and then `path`, oldest first.
    fn all_lines(path: &Path) -> Vec<String> {
        let mut files = rotated_files(path).unwrap_or_default();
        files.push(path.to_path_buf());
        files
            .iter()
            .flat_map(|f| {
                read(f)
                    .lines()
                    .map(|l| l.splitn(4, ' ').nth(3).unwrap_or("").to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Stops the writer until the returned sender is dropped (or sent to).
    async fn pause(store: &LogStore) -> std::sync::mpsc::Sender<()> {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (entered, is_in) = oneshot::channel();
        store.shared.control(Control::Run(Box::new(move || {
            let _ = entered.send(());
            let _ = wait.recv();
        })));
        let _ = is_in.await;
        release
    }

    fn open_fds_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter(|t| t.starts_with(dir))
                    .count()
            })
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn lines_land_in_cri_format_and_rotate() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start(dir.path().to_path_buf(), false);
        let pod = pod();
        let log = store.container(&pod, "c");
        log.lines(b"one\ntwo\r\n");
        log.stdout().note("three");
        store.flush().await;
        let text = read(&store.path(&pod, "c"));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with(" stderr F one"), "{}", lines[0]);
        assert!(lines[2].ends_with(" stdout F three"), "{}", lines[2]);
        assert!(humantime::parse_rfc3339(lines[0].split(' ').next().unwrap_or("")).is_ok());
        store.rotate(&pod, "c").await;
        log.note("four");
        store.flush().await;
        assert_eq!(read(&store.path(&pod, "c")).lines().count(), 1);
        assert_eq!(read(&store.previous_path(&pod, "c")).lines().count(), 3);
    }

    #[tokio::test]
    async fn files_rotate_by_size_and_keep_max_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start_with(
            dir.path().to_path_buf(),
            LogConfig {
                max_size: 1000,
                max_files: 3,
                ..LogConfig::default()
            },
        );
        let pod = pod();
        let log = store.container(&pod, "c");
        for i in 0..200 {
            log.note(&format!("line {i:04}"));
            if i % 7 == 0 {
                store.flush().await; // several batches, not one
            }
        }
        store.flush().await;
        let path = store.path(&pod, "c");
        let rotated = rotated_files(&path).unwrap_or_default();
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        for f in rotated.iter().chain([&path]) {
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            assert!(size <= 1000, "{} has {size} bytes", f.display());
            assert!(read(f).ends_with('\n'), "{} ends mid-line", f.display());
        }
        // What is kept is the newest lines, in order and without a gap.
        let lines = all_lines(&path);
        assert!(lines.len() > 40, "{}", lines.len());
        let first: usize = lines[0]
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        let want: Vec<String> = (first..200).map(|i| format!("line {i:04}")).collect();
        assert_eq!(lines, want);

        // A restart keeps the whole run as the previous one; the next restart replaces it.
        store.rotate(&pod, "c").await;
        let previous = store.previous_path(&pod, "c");
        assert_eq!(all_lines(&previous), want);
        assert!(rotated_files(&path).unwrap_or_default().is_empty());
        log.note("second run");
        store.flush().await;
        assert_eq!(all_lines(&path), ["second run"]);
        store.rotate(&pod, "c").await;
        assert_eq!(all_lines(&previous), ["second run"]);
        assert!(rotated_files(&previous).unwrap_or_default().is_empty());
    }

    #[tokio::test]
    async fn a_removed_pod_closes_its_files_and_drops_late_lines() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start(dir.path().to_path_buf(), false);
        let pod = pod();
        let logs: Vec<ContainerLog> = (0..5)
            .map(|i| store.container(&pod, &format!("c{i}")))
            .collect();
        for l in &logs {
            l.note("hello");
        }
        store.flush().await;
        // Neighbours whose folders sort right before and after it keep their logs.
        let neighbours = [
            PodKey {
                uid: "t".into(),
                ..pod.clone()
            },
            PodKey {
                uid: "u2".into(),
                ..pod.clone()
            },
        ];
        let kept: Vec<ContainerLog> = neighbours
            .iter()
            .map(|n| store.container(n, "c0"))
            .collect();
        let pod_dir = store.pod_dir(&pod);
        assert_eq!(open_fds_under(&pod_dir), 5);
        store.remove_pod(&pod).await;
        assert_eq!(open_fds_under(&pod_dir), 0);
        assert!(!pod_dir.exists());
        for (n, l) in neighbours.iter().zip(&kept) {
            l.note("still here");
            store.flush().await;
            assert_eq!(all_lines(&store.path(n, "c0")), ["still here"]);
            assert!(
                store.lines_dropped(n, "c0").is_some(),
                "{n:?} lost its sink"
            );
        }
        // A line written after the delete does not bring the folder back.
        logs[0].note("late");
        store.flush().await;
        assert!(!pod_dir.exists());
        assert_eq!(store.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn idle_files_are_closed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start_with(
            dir.path().to_path_buf(),
            LogConfig {
                idle_close: Duration::from_millis(10),
                ..LogConfig::default()
            },
        );
        let pod = pod();
        let log = store.container(&pod, "c");
        log.note("one");
        store.flush().await;
        let pod_dir = store.pod_dir(&pod);
        assert_eq!(open_fds_under(&pod_dir), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while open_fds_under(&pod_dir) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(open_fds_under(&pod_dir), 0);
        // Reopened (appending) for the next line.
        log.note("two");
        store.flush().await;
        assert_eq!(all_lines(&store.path(&pod, "c")), ["one", "two"]);
    }

    #[tokio::test]
    async fn a_spammer_loses_its_own_lines_and_the_log_says_how_many() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start_with(
            dir.path().to_path_buf(),
            LogConfig {
                container_buffer: 10_000,
                total_buffer: 1 << 20,
                ..LogConfig::default()
            },
        );
        let pod = pod();
        let spam = store.container(&pod, "spam");
        let quiet = store.container(&pod, "quiet");
        let release = pause(&store).await;
        for i in 0..1000 {
            spam.note(&format!("spam {i:04}"));
        }
        // Bounded while the writer is stuck: one container's buffer.
        assert!(store.queued_bytes() <= 10_000, "{}", store.queued_bytes());
        quiet.note("still here");
        drop(release);
        store.flush().await;
        let lines = all_lines(&store.path(&pod, "spam"));
        let kept = lines.len() - 1;
        assert!(kept > 10 && kept < 1000, "{kept}");
        let want: Vec<String> = (0..kept).map(|i| format!("spam {i:04}")).collect();
        assert_eq!(lines[..kept], want[..]);
        assert_eq!(
            lines[kept],
            format!(
                "wasinode: {} lines dropped (log writer behind)",
                1000 - kept
            )
        );
        assert_eq!(all_lines(&store.path(&pod, "quiet")), ["still here"]);
        // Once the writer has caught up, the count starts again.
        spam.note("after");
        store.flush().await;
        assert_eq!(
            all_lines(&store.path(&pod, "spam"))
                .last()
                .map(String::as_str),
            Some("after")
        );
    }

    #[tokio::test]
    async fn all_containers_together_are_bounded() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = LogStore::start_with(
            dir.path().to_path_buf(),
            LogConfig {
                container_buffer: 10_000,
                total_buffer: 50_000,
                ..LogConfig::default()
            },
        );
        let pod = pod();
        let logs: Vec<ContainerLog> = (0..20)
            .map(|i| store.container(&pod, &format!("c{i}")))
            .collect();
        let release = pause(&store).await;
        for i in 0..500 {
            for l in &logs {
                l.note(&format!("line {i}"));
            }
        }
        assert!(store.queued_bytes() <= 50_000, "{}", store.queued_bytes());
        drop(release);
        store.flush().await;
        assert_eq!(store.queued_bytes(), 0);
        let notes = logs
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                all_lines(&store.path(&pod, &format!("c{i}")))
                    .last()
                    .is_some_and(|l| l.ends_with("lines dropped (log writer behind)"))
            })
            .count();
        assert_eq!(notes, 20);
    }

    #[test]
    fn rotation_stamps_sort_in_time_order() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_550_402, 5);
        assert_eq!(rotation_stamp(t), "20261124-200002.000000005");
        let later = rotation_stamp(t + Duration::from_nanos(10));
        assert!(later > rotation_stamp(t));
    }
}
