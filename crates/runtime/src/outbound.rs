//! Outbound HTTP for guests through the `wasi_experimental_http` import ABI that WAGI guests used.
//!
//! Deny by default: a request goes out only when its URL's scheme, host and port equal one of the
//! module's `allowed_hosts` entries. Redirects are not followed (a redirect could leave the
//! allow-list); the guest sees the 3xx and its Location header.
//!
//! What a guest cannot stretch:
//! - headers: `Host`, `Content-Length` and the hop-by-hop headers (RFC 9110 7.6.1: `Connection`,
//!   `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade` and every header
//!   `Connection` names) are dropped; the client sets `Host` from the URL and frames the body;
//! - memory: the response headers and body a guest holds count against its instance's memory
//!   budget (the same one as its linear memories) until it closes the handle; a response that
//!   does not fit in what is left fails the request;
//! - time: connect and the whole exchange end at the invocation's deadline and at the runtime's
//!   `outbound_timeout`, whichever comes first;
//! - addresses: link-local and cloud metadata addresses ([`is_restricted`]) are refused even under
//!   `insecure:allow-all`, as URL literals and as what a host name resolves to, unless an entry
//!   names that address as an IP literal.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;
use url::{Host as UrlHost, Url};
use wasmtime::{Caller, Extern, Linker};

use crate::run::Host;

const MODULE: &str = "wasi_experimental_http";
/// Most responses a guest may hold open at once.
const MAX_OPEN: usize = 16;

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
const RUNTIME_ERROR: u32 = 12;
const TOO_MANY_SESSIONS: u32 = 13;

#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("allowed_hosts entry {entry:?} is not a URL: {reason}")]
    NotAUrl { entry: String, reason: String },
    #[error("allowed_hosts entry {entry:?} must be http:// or https://")]
    Scheme { entry: String },
    #[error("allowed_hosts entry {entry:?} has no host")]
    NoHost { entry: String },
    #[error(
        "outbound host {entry:?} is not scheme://host:port (Spin's syntax: the scheme http, https \
         or *, a host, *.domain or *, and a port or *; the port may be left out for http and https)"
    )]
    Pattern { entry: String },
}

/// One Spin-style allowed destination: `None` parts match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    scheme: Option<String>,
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`: every name below example.com (not example.com itself).
    Below(String),
}

impl Pattern {
    fn parse(entry: &str) -> Option<Pattern> {
        let (scheme, rest) = entry.split_once("://")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "*" => None,
            s @ ("http" | "https" | "tcp") => Some(s.to_string()),
            _ => return None,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return None;
        }
        // `[v6]:port`, `host:port`, or a host alone.
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            (format!("[{h}]"), after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().ok()?),
            None => Some(match scheme.as_deref() {
                Some("http") => 80,
                Some("https") => 443,
                _ => return None,
            }),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(d) = host.strip_prefix("*.") {
            if d.is_empty() || d.contains('*') {
                return None;
            }
            HostPattern::Below(d.to_string())
        } else if host.contains('*') {
            return None;
        } else {
            // Normalised as a URL would spell it (IPv6 brackets, IDNA).
            let url = Url::parse(&format!("http://{host}/")).ok()?;
            HostPattern::Exact(url.host_str()?.to_string())
        };
        Some(Pattern { scheme, host, port })
    }

    fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme.as_deref().is_none_or(|s| s == scheme)
            && self.port.is_none_or(|p| p == port)
            && match &self.host {
                HostPattern::Any => true,
                HostPattern::Exact(h) => h == host,
                HostPattern::Below(d) => host
                    .strip_suffix(d.as_str())
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            }
    }
}

/// The destinations one module may call: (scheme, host, port) triples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    any: bool,
    origins: Vec<(String, String, u16)>,
    /// Spin-style entries ([`AllowList::parse_spin`]).
    patterns: Vec<Pattern>,
    /// Restricted addresses an entry names as an IP literal: the only ones a request may reach.
    named: Vec<IpAddr>,
}

impl AllowList {
    /// Nothing allowed.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Entries as in the pod annotation: `https://api.example.com`, `http://127.0.0.1:8080`.
    /// `insecure:allow-all` allows every destination (as WAGI did) except the restricted
    /// addresses ([`is_restricted`]); use only for trusted modules. A restricted address is
    /// reachable only through an entry that names it as an IP literal (`http://169.254.169.254`).
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
            if let Some(ip) = literal_ip(&url).filter(|ip| is_restricted(*ip)) {
                list.named.push(ip);
            }
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

    /// Whether a request to `url` may go out, as far as the URL itself tells (a host name's
    /// addresses are checked again when it is resolved).
    pub fn allows(&self, url: &Url) -> bool {
        let Some(o) = origin(url) else {
            return false;
        };
        if let Some(ip) = literal_ip(url)
            && is_restricted(ip)
            && !self.named.contains(&ip)
        {
            return false;
        }
        self.any
            || self.origins.contains(&o)
            || self.patterns.iter().any(|p| p.matches(&o.0, &o.1, o.2))
    }

    /// Whether a guest's `wasi:sockets` TCP connection to `addr` may be made: only under a
    /// `tcp://IP:port` entry (or a `*` scheme), never to a restricted address unless an entry
    /// names it. Hosts are compared as IP literals: sockets see addresses, not names.
    pub fn allows_socket(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        if is_restricted(ip) && !self.named.contains(&ip) {
            return false;
        }
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        self.patterns.iter().any(|p| {
            p.scheme.as_deref().is_none_or(|s| s == "tcp") && p.matches("tcp", &host, addr.port())
        })
    }

    /// Whether any entry allows `wasi:sockets` connections at all.
    pub fn has_sockets(&self) -> bool {
        self.patterns
            .iter()
            .any(|p| p.scheme.as_deref().is_none_or(|s| s == "tcp"))
    }

    /// Entries in Spin's `allowed_outbound_hosts` syntax: `https://api.example.com`,
    /// `http://127.0.0.1:8080`, `https://*.example.com`, `http://localhost:*`, `*://*:*`, and
    /// `tcp://10.0.0.5:5432` for `wasi:sockets` TCP connections.
    /// Scheme, host and port are compared; a wildcard host never reaches the restricted
    /// addresses ([`is_restricted`]), which only an entry naming them as an IP literal reaches.
    pub fn parse_spin<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowListError> {
        let mut list = AllowList::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            let p = Pattern::parse(entry).ok_or_else(|| AllowListError::Pattern {
                entry: entry.to_string(),
            })?;
            if let HostPattern::Exact(h) = &p.host
                && let Ok(url) = Url::parse(&format!("http://{h}/"))
                && let Some(ip) = literal_ip(&url).filter(|ip| is_restricted(*ip))
            {
                list.named.push(ip);
            }
            list.patterns.push(p);
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        !self.any && self.origins.is_empty() && self.patterns.is_empty()
    }
}

/// The URL's host when it is an IP literal, IPv4-mapped IPv6 as IPv4.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        UrlHost::Ipv4(v4) => Some(IpAddr::V4(v4)),
        UrlHost::Ipv6(v6) => Some(IpAddr::V6(v6).to_canonical()),
        UrlHost::Domain(_) => None,
    }
}

/// The AWS metadata service's IPv6 address.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Addresses a guest never reaches unless an allow-list entry names them: IPv4 link-local
/// 169.254.0.0/16 (where cloud metadata services answer, 169.254.169.254), IPv6 link-local
/// fe80::/10, AWS's fd00:ec2::254, and the same IPv4 addresses IPv4-mapped (::ffff:0:0/96) or
/// behind the NAT64 well-known prefix (64:ff9b::/96).
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            (s[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6 || (nat64 && s[6] == 0xa9fe)
        }
    }
}

/// A host name whose every address is restricted: the request is refused as a destination
/// that is not allowed.
#[derive(Debug, thiserror::Error)]
#[error("{name} resolves only to link-local or metadata addresses, which guests may not reach")]
pub(crate) struct RestrictedName {
    name: String,
}

type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
type Lookup = dyn Fn(String) -> LookupFuture + Send + Sync;

/// The outbound client's resolver: the system's (getaddrinfo on a blocking thread, as reqwest's
/// default), minus the restricted addresses. Every connection resolves through it, so a name
/// that is allowed (or `insecure:allow-all`) cannot lead to a restricted address, whatever its
/// DNS answers and however often they change.
pub(crate) struct GuardedResolver {
    lookup: Box<Lookup>,
}

impl GuardedResolver {
    pub(crate) fn system() -> Self {
        Self::with_lookup(|name| {
            Box::pin(
                async move { Ok(tokio::net::lookup_host((name.as_str(), 0)).await?.collect()) },
            )
        })
    }

    pub(crate) fn with_lookup(
        lookup: impl Fn(String) -> LookupFuture + Send + Sync + 'static,
    ) -> Self {
        Self {
            lookup: Box::new(lookup),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_string();
        let lookup = (self.lookup)(name.clone());
        Box::pin(async move {
            let all = lookup.await?;
            let any = !all.is_empty();
            let kept: Vec<SocketAddr> =
                all.into_iter().filter(|a| !is_restricted(a.ip())).collect();
            if any && kept.is_empty() {
                tracing::info!(%name, "outbound request denied: resolves only to restricted addresses");
                return Err(Box::new(RestrictedName { name }) as _);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
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
    /// Bytes of the instance's memory budget this response holds (headers and body).
    held: usize,
}

/// Per-invocation state of the outbound HTTP ABI.
pub(crate) struct OutboundState {
    pub(crate) allow: Arc<AllowList>,
    pub(crate) client: reqwest::Client,
    /// The invocation's deadline, if it has one.
    deadline: Option<Instant>,
    /// Longest one request may take (connect, send, and the whole response).
    bound: Duration,
    responses: HashMap<u32, Response>,
    next: u32,
}

impl OutboundState {
    pub(crate) fn new(
        allow: Arc<AllowList>,
        client: reqwest::Client,
        deadline: Option<Instant>,
        bound: Duration,
    ) -> Self {
        Self {
            allow,
            client,
            deadline,
            bound,
            responses: HashMap::new(),
            next: 1,
        }
    }

    /// How long the next request may take.
    fn time_left(&self) -> Duration {
        match self.deadline {
            Some(d) => self.bound.min(d.saturating_duration_since(Instant::now())),
            None => self.bound,
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

/// Headers that describe one hop (RFC 9110 7.6.1), plus the two the client sets itself.
const NOT_FORWARDED: [&str; 9] = [
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// The guest's headers as they are sent: valid names and values only (else `INVALID_ENCODING`),
/// without `Host`, `Content-Length`, hop-by-hop headers, `Proxy-*` and what `Connection` names.
fn forwarded_headers(headers: &[(String, String)]) -> Result<HeaderMap, u32> {
    let mut named_by_connection: Vec<String> = Vec::new();
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("connection") {
            named_by_connection.extend(
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| INVALID_ENCODING)?;
        let value = HeaderValue::from_str(v).map_err(|_| INVALID_ENCODING)?;
        let n = name.as_str();
        if NOT_FORWARDED.contains(&n)
            || n.starts_with("proxy-")
            || named_by_connection.iter().any(|c| c == n)
        {
            continue;
        }
        map.append(name, value);
    }
    Ok(map)
}

/// Removes from `headers` what [`forwarded_headers`] does not forward: `Host`, `Content-Length`,
/// the hop-by-hop headers, `Proxy-*` and every header `Connection` names. For requests and
/// responses that already are a `HeaderMap` (the `wasi:http` client).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in NOT_FORWARDED {
        headers.remove(n);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for n in proxy {
        headers.remove(n);
    }
}

struct ReqArgs {
    url: Url,
    method: reqwest::Method,
    headers: HeaderMap,
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
    let headers = forwarded_headers(&parse_header_lines(&read_str(
        caller,
        headers_ptr,
        headers_len,
    )?)?)?;
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

/// Whether `e` (or what caused it) is the resolver refusing a restricted name.
pub(crate) fn is_restricted_name(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<RestrictedName>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Sends the request and reads the whole response, refusing one whose headers and body would
/// take more than `budget` bytes.
async fn send(
    client: reqwest::Client,
    args: ReqArgs,
    budget: usize,
) -> Result<(u16, Response), u32> {
    let mut req = client
        .request(args.method, args.url.clone())
        .headers(args.headers);
    if !args.body.is_empty() {
        req = req.body(args.body);
    }
    let resp = req.send().await.map_err(|e| {
        if is_restricted_name(&e) {
            return DESTINATION_NOT_ALLOWED;
        }
        tracing::info!(url = %args.url, error = %e, "outbound request failed");
        REQUEST_ERROR
    })?;
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let too_large = || {
        tracing::info!(url = %args.url, budget, "outbound response refused: larger than the instance's memory left");
        RUNTIME_ERROR
    };
    let room = budget.checked_sub(header_bytes).ok_or_else(too_large)?;
    if resp.content_length().is_some_and(|n| n > room as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp.chunk().await.map_err(|_| REQUEST_ERROR)? {
        if body.len() + chunk.len() > room {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((
        status,
        Response {
            headers,
            held: header_bytes + body.len(),
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
                let budget = caller.data().limiter.available();
                let time = caller.data().outbound.time_left();
                let url = args.url.clone();
                let (status, response) =
                    match tokio::time::timeout(time, send(client, args, budget)).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(code)) => return code,
                        Err(_) => {
                            tracing::info!(%url, ?time, "outbound request timed out");
                            return REQUEST_ERROR;
                        }
                    };
                // The guest did not run while the request was out, so what was left is left.
                if !caller.data_mut().limiter.reserve(response.held) {
                    return RUNTIME_ERROR;
                }
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
                Some(resp) => {
                    caller.data_mut().limiter.release(resp.held);
                    SUCCESS
                }
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

    fn spin(entries: &[&str]) -> AllowList {
        AllowList::parse_spin(entries).unwrap_or_else(|e| panic!("{entries:?}: {e}"))
    }

    #[test]
    fn spin_entries_compare_scheme_host_and_port() {
        let l = spin(&["https://api.example.com", "http://127.0.0.1:8080"]);
        assert!(l.allows(&url("https://api.example.com/x")));
        assert!(!l.allows(&url("http://api.example.com/x")), "scheme");
        assert!(!l.allows(&url("https://api.example.com:8443/")), "port");
        assert!(l.allows(&url("http://127.0.0.1:8080/")));
        assert!(!l.allows(&url("http://127.0.0.1:8081/")));
        assert!(!l.allows(&url("https://evil.com/?api.example.com")));
    }

    #[test]
    fn spin_wildcards_match_what_they_say_and_no_more() {
        let l = spin(&["https://*.example.com", "http://localhost:*"]);
        assert!(l.allows(&url("https://a.example.com/")));
        assert!(l.allows(&url("https://a.b.example.com/")));
        assert!(!l.allows(&url("https://example.com/")), "*.d is below d");
        assert!(!l.allows(&url("https://badexample.com/")));
        assert!(!l.allows(&url("https://example.com.evil.org/")));
        assert!(l.allows(&url("http://localhost:1234/")));
        assert!(!l.allows(&url("https://localhost:1234/")));
        let any = spin(&["*://*:*"]);
        assert!(any.allows(&url("http://10.1.2.3:99/")));
        assert!(
            !any.allows(&url("http://169.254.169.254/")),
            "metadata is never under a wildcard"
        );
        assert!(spin(&["http://169.254.169.254"]).allows(&url("http://169.254.169.254/")));
    }

    #[test]
    fn malformed_spin_entries_are_refused() {
        for bad in [
            "ftp://x",
            "example.com",
            "http://",
            "http://a*b.com",
            "*://x",
            "http://x:notaport",
            "http://x/path",
        ] {
            assert!(AllowList::parse_spin(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn sockets_only_under_tcp_entries() {
        let addr = |s: &str| {
            s.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        assert!(!spin(&["http://10.0.0.5:5432"]).has_sockets());
        let l = spin(&["tcp://10.0.0.5:5432"]);
        assert!(l.has_sockets());
        assert!(l.allows_socket(addr("10.0.0.5:5432")));
        assert!(!l.allows_socket(addr("10.0.0.5:5433")));
        assert!(!l.allows(&url("http://10.0.0.5:5432/")), "tcp is not http");
        let any = spin(&["tcp://*:*"]);
        assert!(any.allows_socket(addr("[::1]:80")));
        assert!(!any.allows_socket(addr("169.254.169.254:80")));
        assert!(!any.allows_socket(addr("[::ffff:169.254.169.254]:80")));
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

    #[test]
    fn host_and_hop_by_hop_headers_are_not_forwarded() {
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let sent = forwarded_headers(&h(&[
            ("Host", "internal.example"),
            ("Connection", "keep-alive, X-Secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eA=="),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Content-Length", "99"),
            ("x-secret", "named by Connection"),
            ("X-Keep", "1"),
            ("Accept", "text/plain"),
        ]))
        .unwrap_or_default();
        let names: Vec<&str> = sent.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep", "accept"]);
        assert_eq!(
            forwarded_headers(&h(&[("bad name", "x")])).err(),
            Some(INVALID_ENCODING)
        );
        assert_eq!(
            forwarded_headers(&h(&[("X", "a\u{7f}b")])).err(),
            Some(INVALID_ENCODING)
        );
    }

    #[test]
    fn restricted_addresses_need_an_entry_that_names_them() {
        let any = AllowList::parse(&["insecure:allow-all"]).unwrap_or_else(|e| panic!("{e}"));
        for u in [
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.0.1:8080/",
            "http://0xa9fea9fe/",
            "http://2852039166/",
            "http://[fe80::1]/",
            "http://[febf::1]/",
            "http://[fd00:ec2::254]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
        ] {
            assert!(!any.allows(&url(u)), "{u} must be refused under allow-all");
        }
        assert!(any.allows(&url("http://169.255.0.1/")));
        assert!(any.allows(&url("http://[fec0::1]/")));
        assert!(any.allows(&url("http://127.0.0.1:9/")));

        let named = AllowList::parse(&["insecure:allow-all", "http://169.254.169.254"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(named.allows(&url("http://169.254.169.254/latest/")));
        assert!(named.allows(&url("http://[::ffff:a9fe:a9fe]/")));
        assert!(
            !named.allows(&url("http://169.254.169.253/")),
            "only the named one"
        );
        let v6 = AllowList::parse(&["http://[fd00:ec2::254]"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.allows(&url("http://[fd00:ec2::254]/")));
        assert!(
            !v6.allows(&url("http://[fd00:ec2::254]:81/")),
            "port differs"
        );
    }

    proptest::proptest! {
        #[test]
        fn link_local_v4_is_restricted_in_every_spelling(c in 0u8.., d in 0u8..) {
            let v4 = std::net::Ipv4Addr::new(169, 254, c, d);
            proptest::prop_assert!(is_restricted(IpAddr::V4(v4)));
            proptest::prop_assert!(is_restricted(IpAddr::V6(v4.to_ipv6_mapped())));
            let [a, b, c, d] = v4.octets();
            let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
            proptest::prop_assert!(is_restricted(IpAddr::V6(nat64)));
        }

        #[test]
        fn other_v4_is_not_restricted(a in 0u8.., b in 0u8.., c in 0u8.., d in 0u8..) {
            proptest::prop_assume!((a, b) != (169, 254));
            proptest::prop_assert!(!is_restricted(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))));
        }

        #[test]
        fn v6_link_local_is_restricted(seg in proptest::array::uniform8(0u16..), low in 0u16..0x40) {
            let mut s = seg;
            s[0] = 0xfe80 | low;
            proptest::prop_assert!(is_restricted(IpAddr::V6(Ipv6Addr::from(s))));
        }
    }

    /// A loopback HTTP server that answers every request `ok`; counts connections.
    fn upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        (addr, hits)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn names_that_resolve_to_restricted_addresses_are_refused() {
        let (up, hits) = upstream();
        // A fake DNS: "metadata.test" is the metadata service, "mixed.test" has a metadata
        // address first and the loopback upstream second, "v6.test" only fe80::1.
        let resolver = GuardedResolver::with_lookup(move |name| {
            let meta: SocketAddr = ([169, 254, 169, 254], 0).into();
            let addrs = match name.as_str() {
                "metadata.test" => vec![meta],
                "mixed.test" => vec![meta, up],
                "v6.test" => vec![SocketAddr::from((
                    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                    0,
                ))],
                _ => vec![],
            };
            Box::pin(async move { Ok(addrs) })
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(resolver))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let allow =
            Arc::new(AllowList::parse(&["insecure:allow-all"]).unwrap_or_else(|e| panic!("{e}")));
        let args = |u: &str| ReqArgs {
            url: url(u),
            method: reqwest::Method::GET,
            headers: HeaderMap::new(),
            body: Vec::new(),
        };
        for name in ["metadata.test", "v6.test"] {
            let u = format!("http://{name}:{}/", up.port());
            assert!(allow.allows(&url(&u)), "the URL itself is allowed");
            let got = send(client.clone(), args(&u), 1 << 20).await.err();
            assert_eq!(got, Some(DESTINATION_NOT_ALLOWED), "{u}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let mixed = format!("http://mixed.test:{}/", up.port());
        let (status, resp) = send(client.clone(), args(&mixed), 1 << 20)
            .await
            .unwrap_or_else(|c| panic!("error {c}"));
        assert_eq!((status, &resp.body[..]), (200, &b"ok"[..]));
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // And a body larger than the budget is refused, not held.
        assert_eq!(
            send(client, args(&mixed), 10).await.err(),
            Some(RUNTIME_ERROR)
        );
    }
}
