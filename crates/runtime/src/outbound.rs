//! Outbound HTTP for guests through the `wasi_experimental_http` import ABI that WAGI guests used.
//!
//! Deny by default: a request goes out only when its URL's scheme, host and port equal one of the
//! module's `allowed_hosts` entries. Redirects are not followed (a redirect could leave the
//! allow-list); the guest sees the 3xx and its Location header.

use std::collections::HashMap;

use bytes::Bytes;
use url::Url;
use wasmtime::{Caller, Extern, Linker};

use crate::run::Host;

const MODULE: &str = "wasi_experimental_http";
/// Most responses a guest may hold open at once.
const MAX_OPEN: usize = 16;
/// Largest response body kept for a guest.
const MAX_BODY: usize = 16 * 1024 * 1024;

// Error codes of the ABI (`http_error` enum in the witx).
const SUCCESS: u32 = 0;
const INVALID_HANDLE: u32 = 1;
const MEMORY_NOT_FOUND: u32 = 2;
const MEMORY_ACCESS_ERROR: u32 = 3;
const BUFFER_TOO_SMALL: u32 = 4;
const HEADER_NOT_FOUND: u32 = 5;
const UTF8_ERROR: u32 = 6;
const DESTINATION_NOT_ALLOWED: u32 = 7;
const INVALID_METHOD: u32 = 8;
const INVALID_ENCODING: u32 = 9;
const INVALID_URL: u32 = 10;
const REQUEST_ERROR: u32 = 11;
const TOO_MANY_SESSIONS: u32 = 13;

#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("allowed_hosts entry {entry:?} is not a URL: {reason}")]
    NotAUrl { entry: String, reason: String },
    #[error("allowed_hosts entry {entry:?} must be http:// or https://")]
    Scheme { entry: String },
    #[error("allowed_hosts entry {entry:?} has no host")]
    NoHost { entry: String },
}

/// The destinations one module may call: (scheme, host, port) triples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    any: bool,
    origins: Vec<(String, String, u16)>,
}

impl AllowList {
    /// Nothing allowed.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Entries as in the pod annotation: `https://api.example.com`, `http://127.0.0.1:8080`.
    /// `insecure:allow-all` allows every destination (as WAGI did); use only for trusted modules.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowListError> {
        let mut list = AllowList::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry == "insecure:allow-all" {
                list.any = true;
                continue;
            }
            let url = Url::parse(entry).map_err(|e| AllowListError::NotAUrl {
                entry: entry.to_string(),
                reason: e.to_string(),
            })?;
            list.origins
                .push(origin(&url).ok_or_else(|| match url.scheme() {
                    "http" | "https" => AllowListError::NoHost {
                        entry: entry.to_string(),
                    },
                    _ => AllowListError::Scheme {
                        entry: entry.to_string(),
                    },
                })?);
        }
        Ok(list)
    }

    pub fn allows(&self, url: &Url) -> bool {
        if self.any {
            return true;
        }
        match origin(url) {
            Some(o) => self.origins.contains(&o),
            None => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.any && self.origins.is_empty()
    }
}

fn origin(url: &Url) -> Option<(String, String, u16)> {
    let scheme = url.scheme();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let host = url.host_str()?.to_ascii_lowercase();
    let port = url.port_or_known_default()?;
    Some((scheme.to_string(), host, port))
}

/// One response a guest holds by handle.
pub(crate) struct Response {
    headers: Vec<(String, String)>,
    body: Bytes,
    read: usize,
}

/// Per-invocation state of the outbound HTTP ABI.
pub(crate) struct OutboundState {
    pub(crate) allow: std::sync::Arc<AllowList>,
    pub(crate) client: reqwest::Client,
    responses: HashMap<u32, Response>,
    next: u32,
}

impl OutboundState {
    pub(crate) fn new(allow: std::sync::Arc<AllowList>, client: reqwest::Client) -> Self {
        Self {
            allow,
            client,
            responses: HashMap::new(),
            next: 1,
        }
    }
}

fn read_bytes(caller: &mut Caller<'_, Host>, ptr: u32, len: u32) -> Result<Vec<u8>, u32> {
    let mem = match caller.get_export("memory") {
        Some(Extern::Memory(m)) => m,
        _ => return Err(MEMORY_NOT_FOUND),
    };
    let data = mem.data(&caller);
    let start = ptr as usize;
    let end = start.checked_add(len as usize).ok_or(MEMORY_ACCESS_ERROR)?;
    data.get(start..end)
        .map(|s| s.to_vec())
        .ok_or(MEMORY_ACCESS_ERROR)
}

fn read_str(caller: &mut Caller<'_, Host>, ptr: u32, len: u32) -> Result<String, u32> {
    String::from_utf8(read_bytes(caller, ptr, len)?).map_err(|_| UTF8_ERROR)
}

fn write_bytes(caller: &mut Caller<'_, Host>, ptr: u32, bytes: &[u8]) -> Result<(), u32> {
    let mem = match caller.get_export("memory") {
        Some(Extern::Memory(m)) => m,
        _ => return Err(MEMORY_NOT_FOUND),
    };
    mem.write(caller, ptr as usize, bytes)
        .map_err(|_| MEMORY_ACCESS_ERROR)
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: u32, v: u32) -> Result<(), u32> {
    write_bytes(caller, ptr, &v.to_le_bytes())
}

/// Headers as the ABI passes them: `Name:Value` lines.
fn parse_header_lines(text: &str) -> Result<Vec<(String, String)>, u32> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (k, v) = line.split_once(':').ok_or(INVALID_ENCODING)?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn header_lines(headers: &[(String, String)]) -> String {
    let mut s = String::new();
    for (k, v) in headers {
        s.push_str(k);
        s.push(':');
        s.push_str(v);
        s.push('\n');
    }
    s
}

struct ReqArgs {
    url: Url,
    method: reqwest::Method,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[allow(clippy::too_many_arguments)]
fn decode_req(
    caller: &mut Caller<'_, Host>,
    url_ptr: u32,
    url_len: u32,
    method_ptr: u32,
    method_len: u32,
    headers_ptr: u32,
    headers_len: u32,
    body_ptr: u32,
    body_len: u32,
) -> Result<ReqArgs, u32> {
    let url_text = read_str(caller, url_ptr, url_len)?;
    let url = Url::parse(&url_text).map_err(|_| INVALID_URL)?;
    let method_text = read_str(caller, method_ptr, method_len)?;
    let method =
        reqwest::Method::from_bytes(method_text.trim().as_bytes()).map_err(|_| INVALID_METHOD)?;
    let headers = parse_header_lines(&read_str(caller, headers_ptr, headers_len)?)?;
    let body = read_bytes(caller, body_ptr, body_len)?;
    if !caller.data().outbound.allow.allows(&url) {
        tracing::info!(%url, "outbound request denied: not in allowed_hosts");
        return Err(DESTINATION_NOT_ALLOWED);
    }
    if caller.data().outbound.responses.len() >= MAX_OPEN {
        return Err(TOO_MANY_SESSIONS);
    }
    Ok(ReqArgs {
        url,
        method,
        headers,
        body,
    })
}

async fn send(client: reqwest::Client, args: ReqArgs) -> Result<(u16, Response), u32> {
    let mut req = client.request(args.method, args.url.clone());
    for (k, v) in &args.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if !args.body.is_empty() {
        req = req.body(args.body);
    }
    let resp = req.send().await.map_err(|e| {
        tracing::info!(url = %args.url, error = %e, "outbound request failed");
        REQUEST_ERROR
    })?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp.chunk().await.map_err(|_| REQUEST_ERROR)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(REQUEST_ERROR);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((
        status,
        Response {
            headers,
            body: Bytes::from(body),
            read: 0,
        },
    ))
}

pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        MODULE,
        "req",
        |mut caller: Caller<'_, Host>,
         (
            url_ptr,
            url_len,
            method_ptr,
            method_len,
            headers_ptr,
            headers_len,
            body_ptr,
            body_len,
            status_out,
            handle_out,
        ): (u32, u32, u32, u32, u32, u32, u32, u32, u32, u32)| {
            Box::new(async move {
                let args = match decode_req(
                    &mut caller,
                    url_ptr,
                    url_len,
                    method_ptr,
                    method_len,
                    headers_ptr,
                    headers_len,
                    body_ptr,
                    body_len,
                ) {
                    Ok(a) => a,
                    Err(code) => return code,
                };
                let client = caller.data().outbound.client.clone();
                let (status, response) = match send(client, args).await {
                    Ok(r) => r,
                    Err(code) => return code,
                };
                let state = &mut caller.data_mut().outbound;
                let handle = state.next;
                state.next = state.next.wrapping_add(1).max(1);
                state.responses.insert(handle, response);
                if let Err(code) = write_bytes(&mut caller, status_out, &status.to_le_bytes()) {
                    return code;
                }
                match write_u32(&mut caller, handle_out, handle) {
                    Ok(()) => SUCCESS,
                    Err(code) => code,
                }
            })
        },
    )?;

    linker.func_wrap(
        MODULE,
        "close",
        |mut caller: Caller<'_, Host>, handle: u32| -> u32 {
            match caller.data_mut().outbound.responses.remove(&handle) {
                Some(_) => SUCCESS,
                None => INVALID_HANDLE,
            }
        },
    )?;

    linker.func_wrap(
        MODULE,
        "header_get",
        |mut caller: Caller<'_, Host>,
         handle: u32,
         name_ptr: u32,
         name_len: u32,
         buf_ptr: u32,
         buf_len: u32,
         written_out: u32|
         -> u32 {
            let name = match read_str(&mut caller, name_ptr, name_len) {
                Ok(n) => n,
                Err(code) => return code,
            };
            let value = {
                let Some(resp) = caller.data().outbound.responses.get(&handle) else {
                    return INVALID_HANDLE;
                };
                let values: Vec<&str> = resp
                    .headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(&name))
                    .map(|(_, v)| v.as_str())
                    .collect();
                if values.is_empty() {
                    return HEADER_NOT_FOUND;
                }
                values.join(", ")
            };
            copy_out(&mut caller, value.as_bytes(), buf_ptr, buf_len, written_out)
        },
    )?;

    let headers_get_all = |mut caller: Caller<'_, Host>,
                           handle: u32,
                           buf_ptr: u32,
                           buf_len: u32,
                           written_out: u32|
     -> u32 {
        let text = match caller.data().outbound.responses.get(&handle) {
            Some(resp) => header_lines(&resp.headers),
            None => return INVALID_HANDLE,
        };
        copy_out(&mut caller, text.as_bytes(), buf_ptr, buf_len, written_out)
    };
    linker.func_wrap(MODULE, "headers_get_all", headers_get_all)?;
    // Some guest bindings import the singular spelling.
    linker.func_wrap(MODULE, "header_get_all", headers_get_all)?;

    linker.func_wrap(
        MODULE,
        "body_read",
        |mut caller: Caller<'_, Host>,
         handle: u32,
         buf_ptr: u32,
         buf_len: u32,
         written_out: u32|
         -> u32 {
            let chunk = match caller.data().outbound.responses.get(&handle) {
                Some(resp) => {
                    let end = resp.body.len().min(resp.read + buf_len as usize);
                    resp.body.slice(resp.read..end)
                }
                None => return INVALID_HANDLE,
            };
            if let Err(code) = write_bytes(&mut caller, buf_ptr, &chunk) {
                return code;
            }
            if let Some(resp) = caller.data_mut().outbound.responses.get_mut(&handle) {
                resp.read += chunk.len();
            }
            match write_u32(&mut caller, written_out, chunk.len() as u32) {
                Ok(()) => SUCCESS,
                Err(code) => code,
            }
        },
    )?;
    Ok(())
}

fn copy_out(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    buf_ptr: u32,
    buf_len: u32,
    written_out: u32,
) -> u32 {
    if bytes.len() > buf_len as usize {
        return BUFFER_TOO_SMALL;
    }
    if let Err(code) = write_bytes(caller, buf_ptr, bytes) {
        return code;
    }
    match write_u32(caller, written_out, bytes.len() as u32) {
        Ok(()) => SUCCESS,
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn scheme_host_and_port_must_all_match() {
        let list = AllowList::parse(&["https://api.brigade.sh", "http://127.0.0.1:8080"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(list.allows(&url("https://api.brigade.sh/v1/x?y")));
        assert!(list.allows(&url("https://API.brigade.sh:443/")));
        assert!(
            !list.allows(&url("http://api.brigade.sh/")),
            "scheme differs"
        );
        assert!(
            !list.allows(&url("https://api.brigade.sh:8443/")),
            "port differs"
        );
        assert!(
            !list.allows(&url("https://evil.api.brigade.sh/")),
            "host differs"
        );
        assert!(list.allows(&url("http://127.0.0.1:8080/a")));
        assert!(!list.allows(&url("http://127.0.0.1:8081/a")));
        assert!(
            !list.allows(&url("http://localhost:8080/a")),
            "names are not resolved"
        );
    }

    #[test]
    fn empty_denies_everything_and_allow_all_allows() {
        assert!(!AllowList::deny_all().allows(&url("http://127.0.0.1/")));
        let any = AllowList::parse(&["insecure:allow-all"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(any.allows(&url("http://example.com:81/")));
    }

    #[test]
    fn bad_entries_are_named() {
        let err = AllowList::parse(&["ftp://x"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("ftp://x"), "{err}");
        let err = AllowList::parse(&["not a url"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not a url"), "{err}");
    }

    #[test]
    fn header_lines_round_trip() {
        let h = parse_header_lines("A:1\nB: two\n\n").unwrap_or_default();
        assert_eq!(
            h,
            vec![("A".into(), "1".into()), ("B".into(), "two".into())]
        );
        assert_eq!(header_lines(&h), "A:1\nB:two\n");
        assert_eq!(parse_header_lines("nocolon"), Err(INVALID_ENCODING));
    }
}
