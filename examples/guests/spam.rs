//! spam: a plain WASI command that writes lines to stderr in a tight loop, as a guest gone
//! chatty would; for the soak benchmark (`bench/run soak`) and log-path tests.
//!
//! Writes `spam <n, 12 digits> the quick brown fox jumps over the lazy dog` to stderr for n = 1 to
//! the count, one `fd_write` per line, as fast as it can; then stdout `spam done: <count> lines`
//! and exit code 0. The count is env `SPAM_LINES` (default 500,000,000; a value that is not an
//! integer gives stderr `bad SPAM_LINES` and exit code 2), so it always stops.

use std::io::Write;

const DEFAULT_LINES: u64 = 500_000_000;

fn main() {
    let count = match std::env::var("SPAM_LINES") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("bad SPAM_LINES {v:?}");
                std::process::exit(2);
            }
        },
        Err(_) => DEFAULT_LINES,
    };

    let err = std::io::stderr();
    let mut err = err.lock();
    let mut line = String::with_capacity(80);
    for n in 1..=count {
        line.clear();
        // One buffer per line: the whole line goes out in one fd_write.
        use std::fmt::Write as _;
        let _ = writeln!(line, "spam {n:012} the quick brown fox jumps over the lazy dog");
        if err.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    drop(err);

    let out = std::io::stdout();
    let mut out = out.lock();
    let _ = writeln!(out, "spam done: {count} lines");
    let _ = out.flush();
}
