//! Reading CRI-format container log files (`<RFC3339 nanos> <stream> <P|F> <line>`) the way
//! `kubectl logs` asks for them: `timestamps`, `tailLines`, `limitBytes`, `sinceSeconds`,
//! `sinceTime`, `previous`, `follow`.
//!
//! A container's log is a set of files (see `workload::logs`): `<c>.log.<timestamp>` rotated
//! ones, oldest first, then the current `<c>.log` (for `previous`, `<c>.log.previous` and its
//! rotated files). [`Cursor`] reads the set forward from where `tailLines` asks (found by
//! reading the files backwards, never loading a whole file), and with `follow` keeps the current
//! file open and reads only what is added; when the current file is replaced (rotated, or the
//! container restarted) it finishes the old one and goes on with the new one, and when it is
//! truncated it starts again at its beginning. [`send`] renders what the cursor reads and streams
//! it to the client; the file I/O runs on Tokio's blocking threads.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Only lines at or after this time (from `sinceTime` or `sinceSeconds`).
    pub since: Option<Timestamp>,
}

impl LogOptions {
    /// From the query string of `/containerLogs/...`; `now` anchors `sinceSeconds`.
    pub fn parse(query: &str, now: SystemTime) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            let v = percent_decode(v);
            let flag = |v: &str| matches!(v, "true" | "1" | "True" | "");
            let num = |v: &str| {
                v.parse::<i64>()
                    .map_err(|_| format!("{k}={v:?} is not an integer"))
            };
            match k {
                "follow" => o.follow = flag(&v),
                "previous" => o.previous = flag(&v),
                "timestamps" => o.timestamps = flag(&v),
                "tailLines" => {
                    let n = num(&v)?;
                    // Negative means "all" for kubectl's default of -1.
                    o.tail_lines = u64::try_from(n).ok();
                }
                "limitBytes" => {
                    let n = num(&v)?;
                    if n <= 0 {
                        return Err(format!("limitBytes={n} must be positive"));
                    }
                    o.limit_bytes = Some(n as u64);
                }
                "sinceSeconds" => {
                    let n = num(&v)?;
                    if n <= 0 {
                        return Err(format!("sinceSeconds={n} must be positive"));
                    }
                    let t = now
                        .checked_sub(Duration::from_secs(n as u64))
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    o.since = Timestamp::try_from(t).ok();
                }
                "sinceTime" => {
                    o.since = Some(
                        Timestamp::from_str(&v)
                            .map_err(|e| format!("sinceTime={v:?} is not RFC 3339: {e}"))?,
                    );
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One parsed CRI log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    pub stamp: &'a str,
    pub stream: &'a str,
    pub text: &'a str,
}

pub fn parse_line(line: &str) -> Option<Line<'_>> {
    let mut parts = line.splitn(4, ' ');
    let stamp = parts.next()?;
    let stream = parts.next()?;
    let _tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    Some(Line {
        stamp,
        stream,
        text,
    })
}

/// Formats one line for the client, or `None` if `since` filters it out.
pub fn render_line(line: &str, o: &LogOptions) -> Option<String> {
    let l = parse_line(line)?;
    if let Some(since) = o.since {
        match Timestamp::from_str(l.stamp) {
            Ok(t) if t < since => return None,
            _ => {}
        }
    }
    Some(if o.timestamps {
        format!("{} {}\n", l.stamp, l.text)
    } else {
        format!("{}\n", l.text)
    })
}

/// What `kubectl logs` shows of a whole file's text (complete lines only), honouring `since`,
/// `tailLines`, `timestamps` and `limitBytes`.
pub fn render(text: &str, o: &LogOptions) -> String {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut lines: Vec<String> = complete.lines().filter_map(|l| render_line(l, o)).collect();
    if let Some(n) = o.tail_lines {
        let n = n as usize;
        if lines.len() > n {
            lines.drain(..lines.len() - n);
        }
    }
    let mut out = lines.concat();
    if let Some(limit) = o.limit_bytes {
        truncate_bytes(&mut out, limit as usize);
    }
    out
}

pub fn truncate_bytes(s: &mut String, limit: usize) {
    if s.len() > limit {
        let mut cut = limit;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// How much one read takes from the files.
const CHUNK: usize = 64 << 10;

/// A line longer than this (no newline in sight) is shown in pieces.
const MAX_PENDING: usize = 1 << 20;

/// How often a follower looks for new lines.
const POLL: Duration = Duration::from_millis(200);

/// A read position in a container's log files. Blocking: use it on a blocking thread.
pub struct Cursor {
    /// The current file of the set (watched for replacement when following).
    path: PathBuf,
    /// The files still to read, the one being read first; the last is the current file as
    /// it was when opened.
    files: VecDeque<File>,
    /// Device and inode of the last file in `files`.
    last_id: Option<(u64, u64)>,
    /// Position in the first file.
    pos: u64,
    /// The current file did not exist when last looked for.
    missing: bool,
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

fn open_existing(path: &Path) -> std::io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Cursor {
    /// Opens the log set whose current file is `path`, positioned at the start of its last
    /// `tail` complete lines (all of them with `None`).
    pub fn open(path: &Path, tail: Option<u64>) -> std::io::Result<Cursor> {
        // The current file first: a rotation that happens meanwhile then shows up both as the
        // file opened here and among the rotated ones, and is read once.
        let current = open_existing(path)?;
        let current_id = match &current {
            Some(f) => Some(file_id(&f.metadata()?)),
            None => None,
        };
        let mut files = Vec::new();
        for r in workload::logs::rotated_files(path)? {
            if let Some(f) = open_existing(&r)?
                && Some(file_id(&f.metadata()?)) != current_id
            {
                files.push(f);
            }
        }
        let last_id = match current {
            Some(f) => {
                files.push(f);
                current_id
            }
            None => match files.last() {
                Some(f) => Some(file_id(&f.metadata()?)),
                None => None,
            },
        };
        let (first, pos) = match tail {
            Some(n) => tail_start(&files, n)?,
            None => (0, 0),
        };
        Ok(Cursor {
            path: path.to_path_buf(),
            files: files.into_iter().skip(first).collect(),
            last_id,
            pos,
            missing: current_id.is_none(),
        })
    }

    /// Whether there was no file at all to read.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Whether the current file was missing when last looked for (the pod's logs are gone, or
    /// nothing was logged yet).
    pub fn missing(&self) -> bool {
        self.missing
    }

    /// Up to `max` more bytes; empty at the end of the current file. At its end it looks whether
    /// the current file was replaced or truncated, and if so goes on with it.
    pub fn read(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; max];
        loop {
            if let Some(f) = self.files.front() {
                let n = f.read_at(&mut buf, self.pos)?;
                if n > 0 {
                    self.pos += n as u64;
                    buf.truncate(n);
                    return Ok(buf);
                }
                if self.files.len() > 1 {
                    self.files.pop_front();
                    self.pos = 0;
                    continue;
                }
            }
            if !self.look_again()? {
                return Ok(Vec::new());
            }
        }
    }

    /// At the end of every file: whether the current file is another one now (then it is
    /// queued after the one being read, which is read to its end first) or was truncated.
    fn look_again(&mut self) -> std::io::Result<bool> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.missing = true;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        self.missing = false;
        if Some(file_id(&meta)) == self.last_id {
            if meta.len() < self.pos {
                self.pos = 0;
                return Ok(true);
            }
            return Ok(false);
        }
        let Some(f) = open_existing(&self.path)? else {
            self.missing = true;
            return Ok(false);
        };
        self.last_id = Some(file_id(&f.metadata()?));
        self.files.push_back(f);
        if self.files.len() == 1 {
            self.pos = 0;
        }
        Ok(true)
    }
}

/// Where the last `n` complete lines of `files` (in order) begin: a file index and offset.
fn tail_start(files: &[File], n: u64) -> std::io::Result<(usize, u64)> {
    // The line starts after the (n+1)-th newline from the end; a partial last line (no newline
    // yet) is not counted.
    let mut newlines = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (i, f) in files.iter().enumerate().rev() {
        let mut end = f.metadata()?.len();
        while end > 0 {
            let start = end.saturating_sub(CHUNK as u64);
            let chunk = &mut buf[..(end - start) as usize];
            f.read_exact_at(chunk, start)?;
            for (j, b) in chunk.iter().enumerate().rev() {
                if *b == b'\n' {
                    newlines += 1;
                    if newlines == n + 1 {
                        return Ok((i, start + j as u64 + 1));
                    }
                }
            }
            end = start;
        }
    }
    Ok((0, 0))
}

/// Renders what `cursor` reads for the client and sends it on `tx`, until the end (without
/// `follow`), or until the client goes, `limitBytes` is reached, or the logs are gone: the
/// current file no longer exists and `gone()` says the pod is not on this node any more.
pub async fn send(
    mut cursor: Cursor,
    opts: LogOptions,
    tx: mpsc::Sender<Bytes>,
    gone: impl Fn() -> bool + Send + 'static,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut sent = 0u64;
    loop {
        let read = tokio::task::spawn_blocking(move || {
            let r = cursor.read(CHUNK);
            (cursor, r)
        })
        .await;
        let bytes = match read {
            Ok((c, Ok(b))) => {
                cursor = c;
                b
            }
            Ok((_, Err(e))) => {
                tracing::warn!("reading a container log: {e}");
                return;
            }
            Err(_) => return,
        };
        if bytes.is_empty() {
            if !opts.follow || tx.is_closed() || (cursor.missing() && gone()) {
                return;
            }
            tokio::time::sleep(POLL).await;
            continue;
        }
        pending.extend_from_slice(&bytes);
        let mut out = String::new();
        let mut used = 0;
        while let Some(i) = pending[used..].iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&pending[used..used + i]);
            if let Some(l) = render_line(&line, &opts) {
                out.push_str(&l);
            }
            used += i + 1;
        }
        pending.drain(..used);
        if pending.len() > MAX_PENDING {
            let line = String::from_utf8_lossy(&pending);
            if let Some(l) = render_line(&line, &opts) {
                out.push_str(&l);
            }
            pending.clear();
        }
        if let Some(limit) = opts.limit_bytes {
            truncate_bytes(&mut out, limit.saturating_sub(sent) as usize);
        }
        sent += out.len() as u64;
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        if opts.limit_bytes.is_some_and(|l| sent >= l) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-11-24T20:00:00.000000001Z stdout F one\n\
2026-11-24T20:00:01.5Z stderr F two words\n\
2026-11-24T20:00:02Z stdout F three\n\
2026-11-24T20:00:03Z stdout F partial";

    #[test]
    fn whole_file_and_options() {
        let o = LogOptions::default();
        assert_eq!(render(LOG, &o), "one\ntwo words\nthree\n");
        let o = LogOptions::parse("tailLines=2&timestamps=true", SystemTime::now()).unwrap();
        assert_eq!(
            render(LOG, &o),
            "2026-11-24T20:00:01.5Z two words\n2026-11-24T20:00:02Z three\n"
        );
        let o = LogOptions::parse("sinceTime=2026-11-24T20%3A00%3A01Z", SystemTime::now()).unwrap();
        assert_eq!(render(LOG, &o), "two words\nthree\n");
        let o = LogOptions::parse("limitBytes=6", SystemTime::now()).unwrap();
        assert_eq!(render(LOG, &o), "one\ntw");
        let o = LogOptions::parse("tailLines=-1&follow=true", SystemTime::now()).unwrap();
        assert!(o.follow);
        assert_eq!(o.tail_lines, None);
    }

    #[test]
    fn since_seconds_is_relative_to_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_550_402); // 20:00:02Z
        let o = LogOptions::parse("sinceSeconds=1", now).unwrap();
        assert_eq!(render(LOG, &o), "two words\nthree\n");
        assert!(LogOptions::parse("sinceSeconds=x", now).is_err());
        assert!(LogOptions::parse("limitBytes=0", now).is_err());
    }
    /// A fresh folder, removed on drop.
    struct TempDir(std::path::PathBuf);
    impl TempDir {
        fn new() -> TempDir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("node-logs-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn texts(bytes: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .filter_map(|l| parse_line(l).map(|l| l.text.to_string()))
            .collect()
    }

    fn read_to_end(c: &mut Cursor) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let b = c.read(100).unwrap_or_default();
            if b.is_empty() {
                return all;
            }
            all.extend(b);
        }
    }

    fn store(dir: &std::path::Path, max_size: u64) -> workload::LogStore {
        workload::LogStore::start_with(
            dir.to_path_buf(),
            workload::logs::LogConfig {
                max_size,
                max_files: 4,
                ..Default::default()
            },
        )
    }

    fn pod() -> workload::PodKey {
        workload::PodKey {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        }
    }

    #[tokio::test]
    async fn tail_reads_across_rotated_files() {
        let dir = TempDir::new();
        let store = store(dir.path(), 500);
        let log = store.container(&pod(), "c");
        for i in 0..100 {
            log.note(&format!("line {i:03}"));
            store.flush().await;
        }
        let path = store.path(&pod(), "c");
        assert_eq!(workload::logs::rotated_files(&path).unwrap().len(), 3);
        let want = |from: usize| {
            (from..100)
                .map(|i| format!("line {i:03}"))
                .collect::<Vec<_>>()
        };
        let mut c = Cursor::open(&path, Some(30)).unwrap();
        assert_eq!(texts(&read_to_end(&mut c)), want(70));
        let mut c = Cursor::open(&path, Some(0)).unwrap();
        assert!(read_to_end(&mut c).is_empty());
        // All that is kept: the newest lines of four files, without a gap.
        let all = texts(&read_to_end(&mut Cursor::open(&path, None).unwrap()));
        assert!(all.len() > 30 && all.len() < 100, "{}", all.len());
        assert_eq!(all, want(100 - all.len()));
        let more = texts(&read_to_end(&mut Cursor::open(&path, Some(1000)).unwrap()));
        assert_eq!(more, all);
    }

    #[tokio::test]
    async fn a_follower_reads_only_what_is_added_across_rotation_and_restart() {
        let dir = TempDir::new();
        let store = store(dir.path(), 300);
        let path = store.path(&pod(), "c");
        // Following before anything was logged.
        let mut c = Cursor::open(&path, Some(0)).unwrap();
        assert!(c.is_empty() && c.missing());
        assert!(read_to_end(&mut c).is_empty());
        let log = store.container(&pod(), "c");
        let mut seen = Vec::new();
        for i in 0..40 {
            log.note(&format!("line {i:02}"));
            store.flush().await;
            if i % 3 == 0 {
                seen.extend(texts(&read_to_end(&mut c)));
            }
        }
        seen.extend(texts(&read_to_end(&mut c)));
        assert!(!workload::logs::rotated_files(&path).unwrap().is_empty());
        let want: Vec<String> = (0..40).map(|i| format!("line {i:02}")).collect();
        assert_eq!(seen, want);
        // The container restarts: the follower goes on with the new run's file.
        store.rotate(&pod(), "c").await;
        log.note("second run");
        store.flush().await;
        assert_eq!(texts(&read_to_end(&mut c)), ["second run"]);
        // A truncated file is read again from its start.
        std::fs::write(&path, "2026-11-24T20:00:00Z stdout F fresh\n").unwrap();
        assert_eq!(texts(&read_to_end(&mut c)), ["fresh"]);
    }

    #[tokio::test]
    async fn send_streams_options_and_stops_at_the_limit() {
        let dir = TempDir::new();
        let path = dir.path().join("c.log");
        std::fs::write(&path, LOG).unwrap();
        let run = |query: &str| {
            let opts = LogOptions::parse(query, SystemTime::now()).unwrap();
            let path = path.clone();
            async move {
                let c = Cursor::open(&path, opts.tail_lines).unwrap();
                let (tx, mut rx) = mpsc::channel(16);
                send(c, opts, tx, || true).await;
                let mut out = String::new();
                while let Some(b) = rx.recv().await {
                    out.push_str(&String::from_utf8_lossy(&b));
                }
                out
            }
        };
        assert_eq!(run("").await, "one\ntwo words\nthree\n");
        assert_eq!(run("tailLines=1").await, "three\n");
        assert_eq!(run("limitBytes=6").await, "one\ntw");
        assert_eq!(
            run("sinceTime=2026-11-24T20%3A00%3A01Z&timestamps=1").await,
            "2026-11-24T20:00:01.5Z two words\n2026-11-24T20:00:02Z three\n"
        );
        // Following a pod that is gone ends once its file is gone too.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(run("follow=true").await, "");
    }
}
