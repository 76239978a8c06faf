//! Runs the real `wasinode` binary and talks HTTP to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The binary under test: `$WASINODE_BIN`, else `target/release/wasinode` next to this test
/// executable's own profile folder (tests run with `cargo test --release`).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WASINODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/wasinode
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let candidate = profile.join("wasinode");
    if candidate.exists() {
        return candidate;
    }
    crate::guests::repo_root().join("target/release/wasinode")
}

/// `wasinode push FILE REF --data-dir DIR` (with extra environment, e.g. `DOCKER_CONFIG`) to
/// completion: the manifest digest it prints, or an error with its stderr.
pub fn push(
    file: &Path,
    reference: &str,
    data_dir: &Path,
    env: &[(&str, &Path)],
) -> Result<String> {
    let mut cmd = Command::new(binary());
    cmd.arg("push")
        .arg(file)
        .arg(reference)
        .arg("--data-dir")
        .arg(data_dir);
    cmd.env("WASINODE_LOG", "warn").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", binary().display()))?;
    if !out.status.success() {
        bail!(
            "push {reference} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A running `wasinode` process; killed on drop.
pub struct Wasinode {
    child: Child,
    log: PathBuf,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Wasinode {
    /// `wasinode <args...> --data-dir <fresh temp dir>`; stdout and stderr go to a file.
    pub fn start(args: &[&str]) -> Result<Wasinode> {
        let tmp = tempfile::tempdir()?;
        Self::start_in(args, tmp)
    }

    /// The same with a given data dir (kept by the caller).
    pub fn start_in(args: &[&str], tmp: tempfile::TempDir) -> Result<Wasinode> {
        let data_dir = tmp.path().join("data");
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .env("WASINODE_LOG", "warn");
        let log = tmp.path().join("wasinode.out");
        Self::spawn(cmd, log, data_dir, Some(tmp))
    }

    /// Spawns a prepared command (arguments, data dir and environment already set); its output
    /// goes to `log`. `keep` is dropped with the process.
    pub fn spawn(
        mut cmd: Command,
        log: PathBuf,
        data_dir: PathBuf,
        keep: Option<tempfile::TempDir>,
    ) -> Result<Wasinode> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with cargo build --release)",
                    binary().display()
                )
            })?;
        Ok(Wasinode {
            child,
            log,
            data_dir,
            _tmp: keep,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `addr` accepts connections; fails early (with the output) if the process exits.
    pub fn wait_listening(&mut self, addr: &str, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "wasinode exited ({status}) before listening on {addr}:\n{}",
                    self.output()
                );
            }
            if Instant::now() > until {
                bail!(
                    "nothing listens on {addr} after {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the output contains `text`.
    pub fn wait_output(&mut self, text: &str, timeout: Duration) -> Result<String> {
        let until = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.contains(text) {
                return Ok(out);
            }
            if Instant::now() > until {
                bail!("no {text:?} in the output after {timeout:?}:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (`INT`, `TERM`, `KILL`).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !st.success() {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }

    /// Ctrl-C, then the exit status.
    pub fn interrupt(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal("INT")?;
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > until {
                bail!(
                    "wasinode still running after {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident memory of the process in KiB (from /proc).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")
    }
}

impl Drop for Wasinode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as a client sees it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// In order, repeated names kept; names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), with extra headers and body.
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no header end in response")?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// The payload of a chunked body (RFC 9112 7.1), trailers dropped.
fn dechunk(mut raw: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = raw.split_once("\r\n").context("no chunk size line")?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).context("chunk cut short")?;
        out.push_str(chunk);
        raw = rest
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .context("no CRLF after a chunk")?;
    }
}

pub fn get(addr: &str, path: &str) -> Result<HttpResponse> {
    http("GET", addr, path, &[], b"")
}

/// Whether something accepts connections on `addr`.
pub fn listening(addr: &str) -> bool {
    TcpStream::connect(addr).is_ok()
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

/// POSTs `size` bytes to `path` while reading the (chunked) response at the same time, keeping
/// neither body; `progress` is called every 8 MiB received. Returns (status, body bytes received,
/// trailers as lowercased `name: value` lines).
pub fn echo_stream(
    addr: &str,
    path: &str,
    size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(u16, u64, Vec<String>)> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = s.try_clone()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nTE: trailers\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    );
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        out.write_all(head.as_bytes())?;
        let chunk = vec![b'z'; 256 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    if !headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        anyhow::bail!("response {status} is not chunked: {headers:?}");
    }
    let mut total = 0u64;
    let mut next = 8 << 20;
    let mut buf = vec![0u8; 64 << 10];
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .with_context(|| format!("chunk size line {line:?}"))?;
        if size == 0 {
            break;
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                anyhow::bail!("connection closed inside a chunk after {total} bytes");
            }
            left -= n as u64;
            total += n as u64;
            if total >= next {
                progress(total);
                next += 8 << 20;
            }
        }
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
    }
    let mut trailers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        trailers.push(line.trim().to_ascii_lowercase());
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the upload thread panicked"))??;
    Ok((status, total, trailers))
}

/// GETs `path` and reads the whole body without keeping it (`Connection: close`); `progress` is
/// called every 8 MiB. Returns (status, Content-Length if given, bytes received).
pub fn download(
    addr: &str,
    path: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<(u16, Option<u64>, u64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok());
    let mut got = 0u64;
    let mut next = 8 << 20;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got >= next {
            progress(got);
            next += 8 << 20;
        }
    }
    Ok((status, length, got))
}

/// The status line and headers (lowercased names) of a response.
fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            return Ok((status, headers));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
}

/// `wasinode run [args...] <yaml written to a fresh dir>`; the dir is returned to keep it.
pub fn run_one(yaml: &str, args: &[&str]) -> Result<(Wasinode, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let m = write_file(dir.path(), "pod.yaml", yaml)?;
    let mut all: Vec<&str> = vec!["run"];
    all.extend_from_slice(args);
    let m = m.display().to_string();
    all.push(&m);
    Ok((Wasinode::start(&all)?, dir))
}

/// The container log `<container>.log` of the (only) pod with such a container under `data_dir`.
pub fn find_log(data_dir: &Path, container: &str) -> Result<String> {
    for entry in std::fs::read_dir(data_dir.join("logs"))? {
        let p = entry?.path().join(format!("{container}.log"));
        if p.exists() {
            return Ok(std::fs::read_to_string(p)?);
        }
    }
    bail!("no log for {container} under {}", data_dir.display())
}

/// A loopback HTTP server answering up to 50 requests with 200 and `body`; its address.
pub fn upstream(body: &'static str) -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in l.incoming().take(50) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(a)
}
