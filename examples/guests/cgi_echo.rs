//! cgi_echo: echoes the whole CGI request back as text, for tests to parse.
//!
//! Answers `Content-Type: text/plain` with, in this order:
//!   - every environment variable as `NAME=value`, one a line, sorted by name;
//!   - one line per argument: `argv[0]=...`, `argv[1]=...`, ... (as the host passes them: for
//!     WAGI, the request path and then the raw query's `&`-separated pieces);
//!   - `stdin=` followed by the whole request body as text (lossy UTF-8), to the end of the
//!     response (it may itself contain newlines; nothing follows it).
//! Values are written as is (a value containing a newline would span lines).
//! Tests use it to check REQUEST_METHOD, PATH_INFO, QUERY_STRING, HTTP_* headers,
//! X_MATCHED_ROUTE, argv and the body handed to the module.

use std::io::{Read, Write};

fn main() {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    vars.sort();

    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).unwrap();

    let mut body = String::new();
    for (k, v) in &vars {
        body.push_str(&format!("{k}={v}\n"));
    }
    for (i, arg) in std::env::args_os().enumerate() {
        body.push_str(&format!("argv[{i}]={}\n", arg.to_string_lossy()));
    }
    body.push_str("stdin=");
    body.push_str(&String::from_utf8_lossy(&stdin));

    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(b"Content-Type: text/plain\n\n").unwrap();
    out.write_all(body.as_bytes()).unwrap();
    out.flush().unwrap();
}
