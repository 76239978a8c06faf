//! http_example: an outbound HTTP GET through the `wasi_experimental_http` host imports.
//!
//! Target URL: the query parameter `url=` (percent-decoded, `%XX` only), or, when absent,
//! the environment variable `TARGET_URL`. The module calls `req` with method GET (or the
//! query's `method=`), the headers given as `h=Name:Value` query parameters (percent-decoded,
//! in order; none by default) and no body, reads the response body with `body_read` until it
//! returns 0 bytes, and answers `Content-Type: text/plain` with `status: <upstream status>\n`
//! followed by the upstream body as is.
//!
//! With `n=<N>` it makes the request N times instead and always answers 200 with one line per
//! request: `request <i>: status <S> (<B> bytes)`, or `request <i>: error <code>` (and stops
//! there). With `keep=1` as well, each response is held (its body not read, its handle not
//! closed) until the end, and its line is `request <i>: status <S> (held)`.
//!
//! Errors:
//!   - no URL at all: `Status: 400 Bad Request`, body `no target url: pass ?url=... or set TARGET_URL\n`
//!   - `req` fails: `Status: 403 Forbidden` when the error code is 7 (destination not
//!     allowed), else `Status: 502 Bad Gateway`; body `outbound request failed: error <code>\n`
//!   - `body_read` fails: `Status: 502 Bad Gateway`, body `reading upstream body failed: error <code>\n`
//! Every outcome is also described by one stderr line, e.g. `GET <url> -> 200 (13 bytes)`.
//! Tests use it for the outbound allow-list and the outbound HTTP plumbing.

use std::io::Write;

#[link(wasm_import_module = "wasi_experimental_http")]
extern "C" {
    fn req(
        url_ptr: *const u8,
        url_len: usize,
        method_ptr: *const u8,
        method_len: usize,
        headers_ptr: *const u8,
        headers_len: usize,
        body_ptr: *const u8,
        body_len: usize,
        status_code_out: *mut u16,
        handle_out: *mut u32,
    ) -> u32;
    fn close(handle: u32) -> u32;
    fn body_read(handle: u32, buf_ptr: *mut u8, buf_len: usize, written_out: *mut usize) -> u32;
}

/// Error code the host returns when the destination is not in the module's allow-list.
const DESTINATION_NOT_ALLOWED: u32 = 7;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Minimal percent-decoding: `%XX` becomes the byte 0xXX; everything else (including `+`
/// and a malformed `%`) is kept as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the first `url=` parameter of the query string, decoded.
fn url_from_query(query: &str) -> Option<String> {
    param(query, "url").filter(|u| !u.is_empty())
}

/// Every value of the `name=` parameter, decoded, in order.
fn params(query: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}=");
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix(prefix.as_str()))
        .map(percent_decode)
        .collect()
}

fn param(query: &str, name: &str) -> Option<String> {
    params(query, name).into_iter().next()
}

/// Sends one request; the upstream status and the handle, or the host's error code.
fn request(url: &str, method: &str, headers: &str) -> Result<(u16, u32), u32> {
    let body: &[u8] = &[];
    let mut status_code: u16 = 0;
    let mut handle: u32 = 0;
    let err = unsafe {
        req(
            url.as_ptr(),
            url.len(),
            method.as_ptr(),
            method.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            &mut status_code,
            &mut handle,
        )
    };
    if err != 0 {
        Err(err)
    } else {
        Ok((status_code, handle))
    }
}

/// Reads the whole body of `handle`.
fn read_body(handle: u32) -> Result<Vec<u8>, u32> {
    let mut upstream = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut written: usize = 0;
        let err = unsafe { body_read(handle, buf.as_mut_ptr(), buf.len(), &mut written) };
        if err != 0 {
            return Err(err);
        }
        if written == 0 {
            return Ok(upstream);
        }
        upstream.extend_from_slice(&buf[..written.min(buf.len())]);
    }
}

/// `n=` mode: the request `n` times, one report line each.
fn repeat(url: &str, method: &str, headers: &str, n: u32, keep: bool) {
    let mut report = String::new();
    for i in 1..=n {
        match request(url, method, headers) {
            Err(err) => {
                report.push_str(&format!("request {i}: error {err}\n"));
                break;
            }
            Ok((status, handle)) if keep => {
                report.push_str(&format!("request {i}: status {status} (held)\n"));
                let _ = handle;
            }
            Ok((status, handle)) => {
                let body = read_body(handle);
                unsafe { close(handle) };
                match body {
                    Ok(b) => report.push_str(&format!("request {i}: status {status} ({} bytes)\n", b.len())),
                    Err(err) => {
                        report.push_str(&format!("request {i}: error {err}\n"));
                        break;
                    }
                }
            }
        }
    }
    eprintln!("http_example: {method} {url} x{n}: {}", report.lines().last().unwrap_or(""));
    respond(None, report.as_bytes());
}

fn respond(status: Option<&str>, body: &[u8]) {
    let out = std::io::stdout();
    let mut out = out.lock();
    if let Some(status) = status {
        write!(out, "Status: {status}\n").unwrap();
    }
    out.write_all(b"Content-Type: text/plain\n\n").unwrap();
    out.write_all(body).unwrap();
    out.flush().unwrap();
}

fn main() {
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let url = match url_from_query(&query).or_else(|| std::env::var("TARGET_URL").ok()) {
        Some(u) if !u.is_empty() => u,
        _ => {
            eprintln!("http_example: no target url (query {query:?}, TARGET_URL unset)");
            respond(
                Some("400 Bad Request"),
                b"no target url: pass ?url=... or set TARGET_URL\n",
            );
            return;
        }
    };

    let method = param(&query, "method").unwrap_or_else(|| "GET".to_string());
    let mut headers = String::new();
    for h in params(&query, "h") {
        headers.push_str(&h);
        headers.push('\n');
    }
    if let Some(n) = param(&query, "n").and_then(|n| n.parse().ok()) {
        repeat(&url, &method, &headers, n, param(&query, "keep").as_deref() == Some("1"));
        return;
    }
    let (status_code, handle) = match request(&url, &method, &headers) {
        Ok(r) => r,
        Err(err) => {
            let status = if err == DESTINATION_NOT_ALLOWED {
                "403 Forbidden"
            } else {
                "502 Bad Gateway"
            };
            eprintln!("http_example: GET {url} failed: error {err}");
            respond(
                Some(status),
                format!("outbound request failed: error {err}\n").as_bytes(),
            );
            return;
        }
    };

    // Read the whole upstream body before answering, so a read error can still change the status.
    let upstream = read_body(handle);
    unsafe { close(handle) };
    let upstream = match upstream {
        Ok(b) => b,
        Err(err) => {
            eprintln!("http_example: GET {url} -> {status_code}, reading body failed: error {err}");
            respond(
                Some("502 Bad Gateway"),
                format!("reading upstream body failed: error {err}\n").as_bytes(),
            );
            return;
        }
    };

    eprintln!("http_example: GET {url} -> {status_code} ({} bytes)", upstream.len());
    let mut body = format!("status: {status_code}\n").into_bytes();
    body.extend_from_slice(&upstream);
    respond(None, &body);
}
