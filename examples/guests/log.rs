//! log: writes three lines to the module's log (stderr) and answers `logged 3 lines`.
//!
//! stderr lines:
//!   `log line 1`
//!   `log line 2`
//!   `log line 3: path=<PATH_INFO> query=<QUERY_STRING>`
//! Response: `Content-Type: text/plain`, body `logged 3 lines\n`.
//! Tests check that the runtime captures guest stderr (logs API / pod logs) and that the
//! third line carries the request's PATH_INFO and QUERY_STRING.

use std::io::Write;

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    let query = std::env::var("QUERY_STRING").unwrap_or_default();

    let err = std::io::stderr();
    let mut err = err.lock();
    writeln!(err, "log line 1").unwrap();
    writeln!(err, "log line 2").unwrap();
    writeln!(err, "log line 3: path={path} query={query}").unwrap();
    err.flush().unwrap();

    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(b"Content-Type: text/plain\n\nlogged 3 lines\n").unwrap();
    out.flush().unwrap();
}
