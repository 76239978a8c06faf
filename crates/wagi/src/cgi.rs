//! The CGI/1.1 environment and argv handed to a WAGI module.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, PROXY_AUTHORIZATION};

use crate::routes::RoutePattern;

/// What the environment is computed from: one request, as received.
#[derive(Clone, Copy, Debug)]
pub struct RequestMeta<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub version: http::Version,
    pub headers: &'a http::HeaderMap,
    pub body_len: usize,
    pub remote_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// `"http"` (or `"https"`).
    pub scheme: &'a str,
}

/// The full CGI/1.1 environment for one request, in a stable order: the CGI
/// and WAGI variables in a fixed order, then one `HTTP_<NAME>` per request
/// header, sorted by variable name.
///
/// `raw_path_info` is the remainder of the raw path after the script name
/// (as in [`crate::routes::RouteMatch::raw_path_info`]).
pub fn environment(
    req: &RequestMeta<'_>,
    pattern: &RoutePattern,
    raw_path_info: &str,
    server_software: &str,
) -> Vec<(String, String)> {
    let mut env = Vec::with_capacity(19 + req.headers.keys_len());
    write_environment(req, pattern, raw_path_info, server_software, &mut |k, v| {
        env.push((k.to_string(), v.to_string()))
    });
    env
}

/// The same variables as [`environment`], in the same order, handed to `put` one by one as
/// borrowed text: what is in the request already is not copied, and what must be built (the
/// URL, numbers, header variable names) is built in a few reused buffers. The request path
/// writes them straight into the guest's environment buffer with this.
pub fn write_environment(
    req: &RequestMeta<'_>,
    pattern: &RoutePattern,
    raw_path_info: &str,
    server_software: &str,
    put: &mut dyn FnMut(&str, &str),
) {
    use std::fmt::Write as _;
    let path_info = decode_path_info(raw_path_info);
    let server = server_address(req);
    let (auth_type, remote_user) = authorization(req.headers);
    let content_type = req
        .headers
        .get(CONTENT_TYPE)
        .map(|v| lossy(v.as_bytes()))
        .unwrap_or_default();
    let query = req.uri.query();
    // One buffer for what is formatted; each value is handed over before the next is written.
    let mut scratch = String::with_capacity(64);

    put("REQUEST_METHOD", req.method.as_str());
    put("SCRIPT_NAME", pattern.script_name());
    put("PATH_INFO", &path_info);
    put("PATH_TRANSLATED", &path_info);
    put("X_RAW_PATH_INFO", raw_path_info);
    match pattern {
        RoutePattern::Exact(_) => put("X_MATCHED_ROUTE", pattern.script_name()),
        RoutePattern::Prefix(_) => {
            scratch.clear();
            scratch.push_str(pattern.script_name());
            scratch.push_str(crate::routes::PREFIX_SUFFIX);
            put("X_MATCHED_ROUTE", &scratch);
        }
    }
    put("QUERY_STRING", query.unwrap_or(""));
    put("CONTENT_TYPE", &content_type);
    scratch.clear();
    let _ = write!(scratch, "{}", req.body_len);
    put("CONTENT_LENGTH", &scratch);
    put("SERVER_NAME", &server.name);
    scratch.clear();
    let _ = write!(scratch, "{}", server.port);
    put("SERVER_PORT", &scratch);
    put("SERVER_PROTOCOL", &protocol(req.version));
    put("SERVER_SOFTWARE", server_software);
    put("GATEWAY_INTERFACE", "CGI/1.1");
    scratch.clear();
    let _ = write!(scratch, "{}", canonical_ip(req.remote_addr.ip()));
    put("REMOTE_ADDR", &scratch);
    put("REMOTE_HOST", &scratch);
    put("AUTH_TYPE", &auth_type);
    put("REMOTE_USER", &remote_user);
    scratch.clear();
    let _ = write!(scratch, "{}://{}", req.scheme, server.name);
    if let Some(port) = server.url_port {
        let _ = write!(scratch, ":{port}");
    }
    scratch.push_str(req.uri.path());
    if let Some(q) = query {
        scratch.push('?');
        scratch.push_str(q);
    }
    put("X_FULL_URL", &scratch);
    http_variables(req.headers, put);
}

/// argv for the module, as WAGI 0.8.1 builds it (`build_argv` in its `src/handlers.rs`; Spin's
/// WAGI executor does the same): argv[0] is the request's URI path as received (the whole path,
/// not the route's SCRIPT_NAME), then each `'&'`-separated piece of the raw query string, in
/// order and undecoded (`b=%20x` stays `b=%20x`; empty pieces are kept, as WAGI keeps them).
pub fn argv(uri_path: &str, query: Option<&str>) -> Vec<String> {
    let mut args = vec![uri_path.to_string()];
    if let Some(q) = query {
        args.extend(q.split('&').map(String::from));
    }
    args
}

/// argv from a module's `argv` template, as WAGI 0.8.1 builds it: `${SCRIPT_NAME}` becomes the
/// request's URI path, `${ARGS}` the raw query string with every `'&'` turned into a space, and
/// the result is split on whitespace.
pub fn argv_from_template(template: &str, uri_path: &str, query: Option<&str>) -> Vec<String> {
    let args = query.unwrap_or("").replace('&', " ");
    template
        .replace("${SCRIPT_NAME}", uri_path)
        .replace("${ARGS}", &args)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// PATH_INFO: percent-decoded; the raw text if decoding gives invalid UTF-8
/// or a NUL (which cannot be carried in an environment variable).
fn decode_path_info(raw: &str) -> Cow<'_, str> {
    match percent_encoding::percent_decode_str(raw).decode_utf8() {
        Ok(d) if !d.contains('\0') => d,
        _ => Cow::Borrowed(raw),
    }
}

fn protocol(version: http::Version) -> Cow<'static, str> {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9".into(),
        http::Version::HTTP_10 => "HTTP/1.0".into(),
        http::Version::HTTP_11 => "HTTP/1.1".into(),
        http::Version::HTTP_2 => "HTTP/2.0".into(),
        http::Version::HTTP_3 => "HTTP/3.0".into(),
        other => format!("{other:?}").into(),
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack listeners) become IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

struct ServerAddress<'a> {
    /// SERVER_NAME: host name, IPv4 address, or `[IPv6]`.
    name: Cow<'a, str>,
    /// SERVER_PORT.
    port: u16,
    /// The port in X_FULL_URL's authority, as the client addressed it (none if it gave none).
    url_port: Option<u16>,
}

/// The server as the client addressed it: the Host header, else the
/// request-target's authority (HTTP/2 `:authority`), else the local socket.
fn server_address<'a>(req: &RequestMeta<'a>) -> ServerAddress<'a> {
    let from_client = req
        .headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_host)
        .or_else(|| req.uri.authority().and_then(|a| parse_host(a.as_str())));
    if let Some((name, url_port)) = from_client {
        let port = url_port.unwrap_or_else(|| default_port(req.scheme, req.local_addr.port()));
        return ServerAddress {
            name: Cow::Borrowed(name),
            port,
            url_port,
        };
    }
    let name = match canonical_ip(req.local_addr.ip()) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let port = req.local_addr.port();
    ServerAddress {
        name: Cow::Owned(name),
        port,
        url_port: Some(port),
    }
}

fn default_port(scheme: &str, fallback: u16) -> u16 {
    if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        fallback
    }
}

/// Parses `host[:port]` (`[v6]:port` for IPv6). Userinfo, paths and other
/// junk are refused, so the caller falls back to another source.
fn parse_host(s: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']')?;
        rest[..close].parse::<Ipv6Addr>().ok()?;
        let name = &s[..close + 2];
        let after = &rest[close + 1..];
        let port = if after.is_empty() {
            None
        } else {
            Some(after.strip_prefix(':')?)
        };
        (name, port)
    } else {
        match s.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (s, None),
        }
    };
    let reg_name_ok = name.starts_with('[')
        || (!name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)));
    if !reg_name_ok {
        return None;
    }
    let port = match port {
        // RFC 3986 allows an empty port; treat it as absent.
        None | Some("") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse::<u16>().ok()?),
        Some(_) => return None,
    };
    Some((name, port))
}

/// AUTH_TYPE (the scheme word) and REMOTE_USER (the Basic user, if any).
fn authorization(headers: &http::HeaderMap) -> (String, String) {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return (String::new(), String::new());
    };
    let text = lossy(value.as_bytes());
    let mut parts = text.trim().splitn(2, [' ', '\t']);
    let scheme = parts.next().unwrap_or("").to_string();
    let credentials = parts.next().unwrap_or("").trim();
    let user = if scheme.eq_ignore_ascii_case("basic") {
        basic_user(credentials).unwrap_or_default()
    } else {
        String::new()
    };
    (scheme, user)
}

/// The user part of Basic credentials (`base64(user:password)`).
fn basic_user(credentials: &str) -> Option<String> {
    let decoded = base64_decode(credentials)?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, _password) = text.split_once(':')?;
    (!user.contains('\0')).then(|| user.to_string())
}

/// Standard-alphabet base64 with optional padding. `None` if malformed.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    let unpadded = match bytes.len() % 4 {
        0 => {
            let pad = bytes.iter().rev().take_while(|&&b| b == b'=').count();
            if pad > 2 {
                return None;
            }
            &bytes[..bytes.len() - pad]
        }
        _ => bytes,
    };
    if unpadded.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(unpadded.len() * 3 / 4);
    for chunk in unpadded.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => {
                acc <<= 6;
                out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8]);
            }
            2 => {
                acc <<= 12;
                out.push((acc >> 16) as u8);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `HTTP_<NAME>` for every header but Authorization and
/// Proxy-Authorization, sorted by variable name. Repeated headers are joined
/// with `", "`; so are distinct headers that map to the same variable
/// (`X-A` and `X_A`).
fn http_variables(headers: &http::HeaderMap, put: &mut dyn FnMut(&str, &str)) {
    let mut vars: Vec<(String, &http::HeaderName)> = headers
        .keys()
        .filter(|&name| name != AUTHORIZATION && name != PROXY_AUTHORIZATION)
        .map(|name| {
            let mut var = String::with_capacity(5 + name.as_str().len());
            var.push_str("HTTP_");
            // Header names are lower-case ASCII here (the http crate's `HeaderName`).
            var.extend(name.as_str().chars().map(|c| match c {
                '-' => '_',
                c => c.to_ascii_uppercase(),
            }));
            (var, name)
        })
        .collect();
    // By variable name; headers that map to the same one keep the request's order.
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut joined = String::new();
    let mut i = 0;
    while i < vars.len() {
        let var = &vars[i].0;
        let same = vars[i..].iter().take_while(|(v, _)| v == var).count();
        let mut values = vars[i..i + same]
            .iter()
            .flat_map(|(_, name)| headers.get_all(*name));
        match (same, headers.get_all(vars[i].1).iter().count()) {
            // The common case: one header, one value, handed over as it came.
            (1, 1) => {
                if let Some(v) = values.next() {
                    put(var, &lossy(v.as_bytes()));
                }
            }
            _ => {
                joined.clear();
                for v in values {
                    if !joined.is_empty() {
                        joined.push_str(", ");
                    }
                    joined.push_str(&lossy(v.as_bytes()));
                }
                put(var, &joined);
            }
        }
        i += same;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method, Uri, Version};

    fn get<'e>(env: &'e [(String, String)], key: &str) -> Option<&'e str> {
        let mut found = env.iter().filter(|(k, _)| k == key);
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{key} appears more than once");
        first
    }

    fn var<'e>(env: &'e [(String, String)], key: &str) -> &'e str {
        get(env, key).unwrap_or_else(|| panic!("{key} missing"))
    }

    struct Req {
        method: Method,
        uri: Uri,
        version: Version,
        headers: HeaderMap,
        body_len: usize,
        remote: SocketAddr,
        local: SocketAddr,
        scheme: &'static str,
    }

    impl Req {
        fn new(uri: &str) -> Self {
            Req {
                method: Method::GET,
                uri: uri.parse().expect("test uri"),
                version: Version::HTTP_11,
                headers: HeaderMap::new(),
                body_len: 0,
                remote: "203.0.113.7:54321".parse().expect("addr"),
                local: "10.0.0.2:3000".parse().expect("addr"),
                scheme: "http",
            }
        }
        fn header(mut self, name: &'static str, value: &str) -> Self {
            self.headers
                .append(name, HeaderValue::from_str(value).expect("test header"));
            self
        }
        fn meta(&self) -> RequestMeta<'_> {
            RequestMeta {
                method: &self.method,
                uri: &self.uri,
                version: self.version,
                headers: &self.headers,
                body_len: self.body_len,
                remote_addr: self.remote,
                local_addr: self.local,
                scheme: self.scheme,
            }
        }
        fn env(&self, pattern: &str, raw_path_info: &str) -> Vec<(String, String)> {
            let pattern = RoutePattern::parse(pattern).expect("pattern");
            environment(&self.meta(), &pattern, raw_path_info, "wasinode/0.1")
        }
    }

    #[test]
    fn realistic_request() {
        let mut req = Req::new("/api/items/caf%C3%A9%20au%20lait?color=red&size=L")
            .header("host", "example.com:8080")
            .header("content-type", "application/json")
            .header("accept", "text/html")
            .header("accept", "application/json")
            .header("x-custom-thing", "yes")
            .header("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")
            .header("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA==")
            .header("user-agent", "curl/8.0");
        req.method = Method::POST;
        req.body_len = 42;
        let env = req.env("/api/...", "/items/caf%C3%A9%20au%20lait");

        assert_eq!(var(&env, "REQUEST_METHOD"), "POST");
        assert_eq!(var(&env, "SCRIPT_NAME"), "/api");
        assert_eq!(var(&env, "PATH_INFO"), "/items/café au lait");
        assert_eq!(var(&env, "PATH_TRANSLATED"), "/items/café au lait");
        assert_eq!(var(&env, "X_RAW_PATH_INFO"), "/items/caf%C3%A9%20au%20lait");
        assert_eq!(var(&env, "X_MATCHED_ROUTE"), "/api/...");
        assert_eq!(var(&env, "QUERY_STRING"), "color=red&size=L");
        assert_eq!(var(&env, "CONTENT_TYPE"), "application/json");
        assert_eq!(var(&env, "CONTENT_LENGTH"), "42");
        assert_eq!(var(&env, "SERVER_NAME"), "example.com");
        assert_eq!(var(&env, "SERVER_PORT"), "8080");
        assert_eq!(var(&env, "SERVER_PROTOCOL"), "HTTP/1.1");
        assert_eq!(var(&env, "SERVER_SOFTWARE"), "wasinode/0.1");
        assert_eq!(var(&env, "GATEWAY_INTERFACE"), "CGI/1.1");
        assert_eq!(var(&env, "REMOTE_ADDR"), "203.0.113.7");
        assert_eq!(var(&env, "REMOTE_HOST"), "203.0.113.7");
        assert_eq!(var(&env, "AUTH_TYPE"), "Basic");
        assert_eq!(var(&env, "REMOTE_USER"), "aladdin");
        assert_eq!(
            var(&env, "X_FULL_URL"),
            "http://example.com:8080/api/items/caf%C3%A9%20au%20lait?color=red&size=L"
        );
        assert_eq!(var(&env, "HTTP_HOST"), "example.com:8080");
        assert_eq!(var(&env, "HTTP_ACCEPT"), "text/html, application/json");
        assert_eq!(var(&env, "HTTP_X_CUSTOM_THING"), "yes");
        assert_eq!(var(&env, "HTTP_USER_AGENT"), "curl/8.0");
        assert_eq!(var(&env, "HTTP_CONTENT_TYPE"), "application/json");
        assert_eq!(get(&env, "HTTP_AUTHORIZATION"), None);
        assert_eq!(get(&env, "HTTP_PROXY_AUTHORIZATION"), None);
        assert!(
            !env.iter()
                .any(|(_, v)| v.contains("YWxhZGRpbjpvcGVuc2VzYW1l")),
            "credentials leaked"
        );
    }

    #[test]
    fn order_is_stable() {
        let a = Req::new("/x?b=1")
            .header("zeta", "1")
            .header("alpha", "2")
            .header("host", "h");
        let b = Req::new("/x?b=1")
            .header("host", "h")
            .header("alpha", "2")
            .header("zeta", "1");
        let ea = a.env("/x", "");
        assert_eq!(ea, b.env("/x", ""));
        let keys: Vec<&str> = ea.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "REQUEST_METHOD",
                "SCRIPT_NAME",
                "PATH_INFO",
                "PATH_TRANSLATED",
                "X_RAW_PATH_INFO",
                "X_MATCHED_ROUTE",
                "QUERY_STRING",
                "CONTENT_TYPE",
                "CONTENT_LENGTH",
                "SERVER_NAME",
                "SERVER_PORT",
                "SERVER_PROTOCOL",
                "SERVER_SOFTWARE",
                "GATEWAY_INTERFACE",
                "REMOTE_ADDR",
                "REMOTE_HOST",
                "AUTH_TYPE",
                "REMOTE_USER",
                "X_FULL_URL",
                "HTTP_ALPHA",
                "HTTP_HOST",
                "HTTP_ZETA",
            ]
        );
    }

    #[test]
    fn minimal_request_defaults() {
        let req = Req::new("/");
        let env = req.env("/...", "/");
        assert_eq!(var(&env, "SCRIPT_NAME"), "");
        assert_eq!(var(&env, "PATH_INFO"), "/");
        assert_eq!(var(&env, "X_MATCHED_ROUTE"), "/...");
        assert_eq!(var(&env, "QUERY_STRING"), "");
        assert_eq!(var(&env, "CONTENT_TYPE"), "");
        assert_eq!(var(&env, "CONTENT_LENGTH"), "0");
        assert_eq!(var(&env, "AUTH_TYPE"), "");
        assert_eq!(var(&env, "REMOTE_USER"), "");
        // No Host: the local socket.
        assert_eq!(var(&env, "SERVER_NAME"), "10.0.0.2");
        assert_eq!(var(&env, "SERVER_PORT"), "3000");
        assert_eq!(var(&env, "X_FULL_URL"), "http://10.0.0.2:3000/");
        assert!(!env.iter().any(|(k, _)| k.starts_with("HTTP_")));
    }

    #[test]
    fn content_type_comes_from_the_real_header() {
        // A header literally named CONTENT_TYPE (underscore) is just another
        // header; it must not feed CONTENT_TYPE.
        let req = Req::new("/").header("content_type", "text/evil");
        let env = req.env("/", "");
        assert_eq!(var(&env, "CONTENT_TYPE"), "");
        assert_eq!(var(&env, "HTTP_CONTENT_TYPE"), "text/evil");
        let req = Req::new("/").header("Content-Type", "text/plain; charset=utf-8");
        assert_eq!(
            var(&req.env("/", ""), "CONTENT_TYPE"),
            "text/plain; charset=utf-8"
        );
    }

    #[test]
    fn colliding_header_names_are_joined() {
        let req = Req::new("/").header("x-a", "1").header("x_a", "2");
        let env = req.env("/", "");
        let v = var(&env, "HTTP_X_A");
        assert!(v == "1, 2" || v == "2, 1", "{v}");
    }

    #[test]
    fn ipv6_host_and_peers() {
        let mut req = Req::new("/p?q").header("host", "[::1]:8080");
        req.remote = "[2001:db8::5]:4000".parse().expect("addr");
        req.local = "[::1]:8080".parse().expect("addr");
        let env = req.env("/p", "");
        assert_eq!(var(&env, "SERVER_NAME"), "[::1]");
        assert_eq!(var(&env, "SERVER_PORT"), "8080");
        assert_eq!(var(&env, "REMOTE_ADDR"), "2001:db8::5");
        assert_eq!(var(&env, "X_FULL_URL"), "http://[::1]:8080/p?q");

        let req = Req::new("/").header("host", "[fe80::1]");
        let env = req.env("/", "");
        assert_eq!(var(&env, "SERVER_NAME"), "[fe80::1]");
        assert_eq!(var(&env, "SERVER_PORT"), "80");
        assert_eq!(var(&env, "X_FULL_URL"), "http://[fe80::1]/");

        // No Host, IPv6 local socket.
        let mut req = Req::new("/");
        req.local = "[::1]:9000".parse().expect("addr");
        let env = req.env("/", "");
        assert_eq!(var(&env, "SERVER_NAME"), "[::1]");
        assert_eq!(var(&env, "X_FULL_URL"), "http://[::1]:9000/");
    }

    #[test]
    fn ipv4_mapped_client_is_shown_as_ipv4() {
        let mut req = Req::new("/");
        req.remote = "[::ffff:192.0.2.9]:1234".parse().expect("addr");
        assert_eq!(var(&req.env("/", ""), "REMOTE_ADDR"), "192.0.2.9");
    }

    #[test]
    fn host_without_port_uses_scheme_default() {
        let req = Req::new("/a").header("host", "example.org");
        let env = req.env("/a", "");
        assert_eq!(var(&env, "SERVER_NAME"), "example.org");
        assert_eq!(var(&env, "SERVER_PORT"), "80");
        assert_eq!(var(&env, "X_FULL_URL"), "http://example.org/a");
        let mut req = Req::new("/a").header("host", "example.org");
        req.scheme = "https";
        let env = req.env("/a", "");
        assert_eq!(var(&env, "SERVER_PORT"), "443");
        assert_eq!(var(&env, "X_FULL_URL"), "https://example.org/a");
    }

    #[test]
    fn bad_host_falls_back() {
        for bad in [
            "",
            "a b",
            "user@host",
            "h:99999",
            "h:x",
            "[::1",
            "[zz]:80",
            "a:1:2",
        ] {
            let req = Req::new("/").header("host", bad);
            let env = req.env("/", "");
            assert_eq!(var(&env, "SERVER_NAME"), "10.0.0.2", "host {bad:?}");
            assert_eq!(var(&env, "SERVER_PORT"), "3000", "host {bad:?}");
        }
    }

    #[test]
    fn http2_authority_without_host() {
        let mut req = Req::new("https://svc.local:8443/x?y=1");
        req.version = Version::HTTP_2;
        req.scheme = "https";
        let env = req.env("/x", "");
        assert_eq!(var(&env, "SERVER_NAME"), "svc.local");
        assert_eq!(var(&env, "SERVER_PORT"), "8443");
        assert_eq!(var(&env, "SERVER_PROTOCOL"), "HTTP/2.0");
        assert_eq!(var(&env, "X_FULL_URL"), "https://svc.local:8443/x?y=1");
    }

    #[test]
    fn protocols() {
        for (v, s) in [
            (Version::HTTP_09, "HTTP/0.9"),
            (Version::HTTP_10, "HTTP/1.0"),
            (Version::HTTP_11, "HTTP/1.1"),
            (Version::HTTP_2, "HTTP/2.0"),
            (Version::HTTP_3, "HTTP/3.0"),
        ] {
            assert_eq!(protocol(v), s);
        }
    }

    #[test]
    fn path_info_decoding() {
        let req = Req::new("/");
        let env = req.env("/a/...", "/x%2Fy%20z");
        assert_eq!(var(&env, "PATH_INFO"), "/x/y z");
        // Invalid UTF-8 after decoding: the raw text.
        let env = req.env("/a/...", "/%FF%FE");
        assert_eq!(var(&env, "PATH_INFO"), "/%FF%FE");
        assert_eq!(var(&env, "X_RAW_PATH_INFO"), "/%FF%FE");
        // NUL cannot live in an environment variable: the raw text.
        let env = req.env("/a/...", "/a%00b");
        assert_eq!(var(&env, "PATH_INFO"), "/a%00b");
        // '+' is not a space in a path.
        let env = req.env("/a/...", "/a+b");
        assert_eq!(var(&env, "PATH_INFO"), "/a+b");
    }

    #[test]
    fn authorization_variants() {
        let cases = [
            ("Bearer abc.def", "Bearer", ""),
            ("basic dXNlcjpwYXNz", "basic", "user"),
            ("Basic dXNlcjo=", "Basic", "user"),
            ("Basic OnBhc3M=", "Basic", ""),
            ("Basic not-base64!", "Basic", ""),
            ("Basic dXNlcg==", "Basic", ""), // no ':'
            ("Basic", "Basic", ""),
            ("Digest username=\"x\"", "Digest", ""),
        ];
        for (header, scheme, user) in cases {
            let req = Req::new("/").header("authorization", header);
            let env = req.env("/", "");
            assert_eq!(var(&env, "AUTH_TYPE"), scheme, "{header}");
            assert_eq!(var(&env, "REMOTE_USER"), user, "{header}");
        }
    }

    #[test]
    fn non_utf8_header_values_are_lossy() {
        let mut req = Req::new("/");
        req.headers.insert(
            "x-bin",
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text is allowed"),
        );
        assert_eq!(var(&req.env("/", ""), "HTTP_X_BIN"), "caf\u{fffd}");
    }

    #[test]
    fn base64_decoder() {
        let cases: [(&str, &[u8]); 8] = [
            ("", b""),
            ("Zg==", b"f"),
            ("Zm8=", b"fo"),
            ("Zm9v", b"foo"),
            ("Zm9vYg", b"foob"),
            ("Zm9vYmE=", b"fooba"),
            ("Zm9vYmFy", b"foobar"),
            ("+/+/", &[0xfb, 0xff, 0xbf]),
        ];
        for (input, expected) in cases {
            assert_eq!(base64_decode(input).as_deref(), Some(expected), "{input}");
        }
        for bad in ["Z", "Zm9vY", "Zg===", "Z===", "Zm9v!", "=Zg=", "Zg=a"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn argv_is_the_uri_path_then_the_raw_query_pieces() {
        assert_eq!(argv("/hello", None), vec!["/hello"]);
        assert_eq!(argv("/hello", Some("")), vec!["/hello", ""]);
        assert_eq!(
            argv(
                "/app/sub%20dir/x",
                Some("name=John+Doe&greeting=hi%20there&x%3Dy=1")
            ),
            vec![
                "/app/sub%20dir/x",
                "name=John+Doe",
                "greeting=hi%20there",
                "x%3Dy=1"
            ]
        );
        assert_eq!(
            argv("/h", Some("a&&b&flag&")),
            vec!["/h", "a", "", "b", "flag", ""]
        );
        assert_eq!(argv("/h", Some("a=1&b=%20x")), vec!["/h", "a=1", "b=%20x"]);
    }

    #[test]
    fn argv_templates() {
        assert_eq!(
            argv_from_template("${SCRIPT_NAME} ${ARGS}", "/a/b", Some("x=1&y=%20")),
            vec!["/a/b", "x=1", "y=%20"]
        );
        assert_eq!(
            argv_from_template("prog --in ${ARGS} --path=${SCRIPT_NAME}", "/p", None),
            vec!["prog", "--in", "--path=/p"]
        );
        assert_eq!(
            argv_from_template("${SCRIPT_NAME}", "/p", Some("a&&b")),
            vec!["/p"]
        );
    }
}
