//! Where a guest's stdout/stderr go: captured in memory (WAGI responses, per-request logs) or
//! streamed line by line to a sink (long-running WASI commands).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Most of a guest's stdout kept when it is captured (a WAGI response, head and body).
pub const STDOUT_CAPTURE_LIMIT: usize = 32 << 20;
/// Most of a guest's stderr kept when it is captured (per-request log lines).
pub const STDERR_CAPTURE_LIMIT: usize = 1 << 20;

/// Receives complete lines (without the trailing newline) as the guest writes them.
pub trait LineSink: Send + Sync + 'static {
    fn line(&self, line: &[u8]);
}

/// How one of the guest's output streams is handled.
#[derive(Clone)]
pub enum Stream {
    /// Keep up to `limit` bytes in memory; writing past it fails the guest's write.
    Capture { limit: usize },
    /// Hand each line to the sink as it is written.
    Lines(Arc<dyn LineSink>),
    /// Drop everything.
    Discard,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Capture { limit } => write!(f, "Capture({limit})"),
            Stream::Lines(_) => f.write_str("Lines"),
            Stream::Discard => f.write_str("Discard"),
        }
    }
}

/// Output that is thrown away.
pub(crate) struct DiscardStream;

impl IsTerminal for DiscardStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for DiscardStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(tokio::io::sink())
    }
}

pub(crate) struct LineStream(pub(crate) Arc<dyn LineSink>);

impl IsTerminal for LineStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LineStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            sink: self.0.clone(),
            partial: Vec::new(),
        })
    }
}

/// Splits what is written into lines; a partial last line is sent on flush, shutdown or drop.
struct LineWriter {
    sink: Arc<dyn LineSink>,
    partial: Vec<u8>,
}

/// A line longer than this is cut into pieces so one guest cannot hold unbounded memory.
const MAX_LINE: usize = 16 * 1024;

impl LineWriter {
    fn push(&mut self, mut buf: &[u8]) {
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&buf[..pos]);
            self.emit();
            buf = &buf[pos + 1..];
        }
        self.partial.extend_from_slice(buf);
        while self.partial.len() > MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            self.emit();
            self.partial = rest;
        }
    }

    fn emit(&mut self) {
        let line = std::mem::take(&mut self.partial);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        self.sink.line(line);
    }

    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            self.emit();
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flush_partial();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.flush_partial();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);
    impl LineSink for Collect {
        fn line(&self, line: &[u8]) {
            if let Ok(mut v) = self.0.lock() {
                v.push(String::from_utf8_lossy(line).into_owned());
            }
        }
    }

    #[test]
    fn splits_lines_and_flushes_the_tail_on_drop() {
        let sink = Arc::new(Collect::default());
        {
            let mut w = LineWriter {
                sink: sink.clone(),
                partial: Vec::new(),
            };
            w.push(b"one\ntw");
            w.push(b"o\r\nthree");
        }
        let got = sink.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(got, vec!["one", "two", "three"]);
    }

    #[test]
    fn very_long_lines_are_cut() {
        let sink = Arc::new(Collect::default());
        let mut w = LineWriter {
            sink: sink.clone(),
            partial: Vec::new(),
        };
        w.push(&vec![b'x'; MAX_LINE * 2 + 10]);
        drop(w);
        let got = sink.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|l| l.len() <= MAX_LINE));
    }
}
