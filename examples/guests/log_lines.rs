//! log_lines: a WASI command that writes numbered lines to stderr, then rests.
//!
//! Environment (all optional):
//!   `LINES`    how many lines (default 3);
//!   `EVERY_MS` milliseconds between lines (default 0: a tight loop);
//!   `PAD`      that many `x`s appended to each line (default 0);
//!   `REST_S`   seconds to sleep after the last line (default 3600), then exit 0; with
//!              `REST_S=0` it exits at once with the code in `EXIT_CODE` (default 0).
//! Line `i` (from 0) is `line <i, 7 digits>` followed by ` <PAD x's>` when PAD > 0, written
//! with one `fd_write` each. Then stderr `done <LINES>`.
//! Tests use it as a pod that logs and then sits idle (LINES small), as a spammer (LINES huge,
//! EVERY_MS 0), and to fill log files until they rotate.

use std::io::Write;
use std::time::Duration;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    let lines = env_u64("LINES", 3);
    let every = env_u64("EVERY_MS", 0);
    let pad = env_u64("PAD", 0) as usize;
    let rest = env_u64("REST_S", 3600);
    let padding = if pad > 0 {
        format!(" {}", "x".repeat(pad))
    } else {
        String::new()
    };
    let err = std::io::stderr();
    let mut buf = String::new();
    for i in 0..lines {
        buf.clear();
        buf.push_str("line ");
        let n = i.to_string();
        for _ in n.len()..7 {
            buf.push('0');
        }
        buf.push_str(&n);
        buf.push_str(&padding);
        buf.push('\n');
        let _ = err.lock().write_all(buf.as_bytes());
        if every > 0 {
            std::thread::sleep(Duration::from_millis(every));
        }
    }
    let _ = err.lock().write_all(format!("done {lines}\n").as_bytes());
    if rest == 0 {
        std::process::exit(env_u64("EXIT_CODE", 0) as i32);
    }
    for _ in 0..rest {
        std::thread::sleep(Duration::from_secs(1));
    }
}
