//! Property tests for the WAGI protocol crate.

use proptest::prelude::*;
use wagi::response;
use wagi::routes::{RoutePattern, RouteTable};

/// Bytes drawn mostly from the characters that matter to the parser, so
/// the generator reaches deep into header parsing, not just "no newline".
fn cgi_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b":".to_vec()),
        Just(b" ".to_vec()),
        Just(b"Status".to_vec()),
        Just(b"Content-Type".to_vec()),
        Just(b"Location".to_vec()),
        Just(b"404".to_vec()),
        Just(b"1".to_vec()),
        "[a-zA-Z0-9 -]{1,6}".prop_map(String::into_bytes),
        any::<u8>().prop_map(|b| vec![b]),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

fn header_name() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9-]{0,15}".prop_filter("reserved names", |n| {
        let l = n.to_ascii_lowercase();
        l != "status" && l != "location" && l != "content-type"
    })
}

fn header_value() -> impl Strategy<Value = String> {
    "[ -~]{0,40}".prop_map(|v| v.trim_matches([' ', '\t']).to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = response::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_cgi_like_bytes(bytes in cgi_ish_bytes()) {
        if let Ok(r) = response::parse(&bytes) {
            prop_assert!(r.body_offset <= bytes.len());
            prop_assert!(r.headers.len() <= response::MAX_HEADERS);
        }
    }

    #[test]
    fn valid_response_round_trips(
        content_type in "[a-z]{1,10}/[a-z0-9.+-]{1,12}",
        extra in prop::collection::vec((header_name(), header_value()), 0..20),
        crlf in prop::collection::vec(any::<bool>(), 22),
        status in prop::option::of(200u16..600),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut headers = vec![("Content-Type".to_string(), content_type)];
        headers.extend(extra);
        let eol = |i: usize| if crlf[i % crlf.len()] { "\r\n" } else { "\n" };
        let mut out = String::new();
        let mut line = 0;
        if let Some(code) = status {
            out.push_str(&format!("Status: {code} Whatever{}", eol(line)));
            line += 1;
        }
        for (name, value) in &headers {
            out.push_str(&format!("{name}: {value}{}", eol(line)));
            line += 1;
        }
        out.push_str(eol(line));
        let head_len = out.len();
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);

        let r = response::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(r.status.as_u16(), status.unwrap_or(200));
        prop_assert_eq!(r.body_offset, head_len);
        prop_assert_eq!(&bytes[r.body_offset..], &body[..]);
        let got: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let want: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        prop_assert_eq!(got, want);
    }
}

/// Patterns and paths over a tiny alphabet so that overlaps are common.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("ab"), Just("a%20"), Just("")].prop_map(String::from)
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..4).prop_map(|segs| format!("/{}", segs.join("/")))
}

fn pattern() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just("ab"), Just("a%20")],
            0..3,
        ),
        any::<bool>(),
    )
        .prop_map(|(segs, prefix)| {
            let body: String = segs.iter().map(|s| format!("/{s}")).collect();
            match (body.is_empty(), prefix) {
                (true, true) => "/...".to_string(),
                (true, false) => "/".to_string(),
                (false, true) => format!("{body}/..."),
                (false, false) => body,
            }
        })
}

/// Brute force: among all matching patterns, exact beats prefix and a longer
/// prefix beats a shorter one.
fn reference<'p>(patterns: &'p [RoutePattern], raw_path: &str) -> Option<&'p RoutePattern> {
    patterns
        .iter()
        .filter(|p| p.matches(raw_path))
        .max_by_key(|p| (matches!(p, RoutePattern::Exact(_)), p.script_name().len()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn lookup_returns_most_specific(
        declared in prop::collection::vec(pattern(), 0..12),
        paths in prop::collection::vec(path(), 1..10),
    ) {
        let mut table = RouteTable::new();
        let mut patterns = Vec::new();
        for (i, s) in declared.iter().enumerate() {
            let p = RoutePattern::parse(s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if patterns.contains(&p) {
                prop_assert!(table.insert(p, i).is_err());
            } else {
                table.insert(p.clone(), i).map_err(|e| TestCaseError::fail(e.to_string()))?;
                patterns.push(p);
            }
        }
        prop_assert_eq!(table.len(), patterns.len());
        for raw_path in &paths {
            let want = reference(&patterns, raw_path);
            let got = table.lookup(raw_path);
            prop_assert_eq!(got.as_ref().map(|m| m.pattern), want, "path {}", raw_path);
            if let Some(m) = got {
                prop_assert!(m.pattern.matches(raw_path));
                prop_assert_eq!(
                    format!("{}{}", m.pattern.script_name(), m.raw_path_info),
                    raw_path.clone()
                );
                prop_assert!(patterns.contains(m.pattern));
            }
        }
    }
}

proptest! {
    /// argv is the URI path and then the raw query: joined back with '&', it is the query.
    #[test]
    fn argv_keeps_the_raw_query(path in "/[!-~]{0,20}", query in proptest::option::of("[ -~]{0,40}")) {
        let args = wagi::cgi::argv(&path, query.as_deref());
        prop_assert_eq!(&args[0], &path);
        match &query {
            None => prop_assert_eq!(args.len(), 1),
            Some(q) => prop_assert_eq!(&args[1..].join("&"), q),
        }
    }

    /// With a template, no argument is empty or holds whitespace, and `${ARGS}` gives the
    /// query's pieces that are not empty.
    #[test]
    fn argv_template_pieces(path in "/[a-zA-Z0-9%/._~-]{0,20}", query in "[a-zA-Z0-9%=&+._~-]{0,40}") {
        let args = wagi::cgi::argv_from_template("${SCRIPT_NAME} ${ARGS}", &path, Some(&query));
        prop_assert!(args.iter().all(|a| !a.is_empty() && !a.contains(char::is_whitespace)));
        let want: Vec<&str> = std::iter::once(path.as_str())
            .chain(query.split('&').filter(|p| !p.is_empty()))
            .collect();
        prop_assert_eq!(args, want);
    }
}
