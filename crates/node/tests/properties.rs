//! Property tests for what the kubelet API reads from its callers: the query string of
//! `/containerLogs/...` ([`LogOptions::parse`]) and the request path and method that decide
//! which `nodes/<subresource>` permission a request needs ([`server::attributes`]).

use std::time::{Duration, SystemTime};

use http::Method;
use k8s_openapi::jiff::tz::Offset;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use node::logs::{LogOptions, render};
use node::server::attributes;
use proptest::prelude::*;

/// The kubelet's `isSubpath` (pkg/kubelet/server/auth.go): `path` is `prefix` or below it.
fn is_subpath(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The subresource the kubelet asks a SubjectAccessReview for, for a request path.
fn kubelet_subresource(path: &str) -> &'static str {
    [
        ("/stats", "stats"),
        ("/metrics", "metrics"),
        ("/logs", "log"),
        ("/spec", "spec"),
    ]
    .into_iter()
    .find(|(prefix, _)| is_subpath(path, prefix))
    .map_or("proxy", |(_, sub)| sub)
}

/// Request paths built from the segments that matter to the mapping.
fn request_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just("stats".to_string()),
        Just("metrics".to_string()),
        Just("logs".to_string()),
        Just("spec".to_string()),
        Just("containerLogs".to_string()),
        Just("summary".to_string()),
        Just("..".to_string()),
        Just("%2F".to_string()),
        "[ -~]{0,4}",
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE),
        Just(Method::OPTIONS),
        Just(Method::CONNECT),
        Just(Method::TRACE),
        "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)),
    ]
}

/// A query value as a client may encode it: each byte raw where that is unambiguous, or as
/// `%XX` (either case); a space may also be `+`.
fn encode(value: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    for (i, b) in value.bytes().enumerate() {
        let c = choices.get(i % choices.len().max(1)).copied().unwrap_or(0);
        let must = matches!(b, b'&' | b'%' | b'+' | b'#') || !b.is_ascii_graphic();
        match (b, c % 3) {
            (b' ', 0) => out.push('+'),
            (_, 1) => out.push_str(&format!("%{b:02X}")),
            (_, 2) => out.push_str(&format!("%{b:02x}")),
            _ if must => out.push_str(&format!("%{b:02X}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// Times a log line may carry (years 1900 to 2200, nanoseconds), shown in any UTC offset.
fn timestamp() -> impl Strategy<Value = (Timestamp, i32)> {
    (
        -2_208_988_800i64..7_258_118_400,
        0i32..1_000_000_000,
        -86_340i32 / 60..86_340 / 60,
    )
        .prop_map(|(s, n, offset_minutes)| {
            (
                Timestamp::new(s, n).unwrap_or(Timestamp::UNIX_EPOCH),
                offset_minutes * 60,
            )
        })
}

#[derive(Debug, Clone)]
enum Since {
    Seconds(i64),
    Time(Timestamp, i32),
}

/// One `kubectl logs` request: what it asks for, as the client encodes it.
#[derive(Debug, Clone)]
struct Query {
    follow: Option<bool>,
    previous: Option<bool>,
    timestamps: Option<bool>,
    tail_lines: Option<i64>,
    limit_bytes: Option<i64>,
    since: Option<Since>,
    /// Parameters the kubelet API ignores (`container`, `insecureSkipTLSVerifyBackend`, ...).
    unknown: Vec<(String, String)>,
    /// How each pair is ordered and each byte encoded.
    order: Vec<usize>,
    encoding: Vec<u8>,
}

fn query() -> impl Strategy<Value = Query> {
    let since = prop_oneof![
        (1i64..i64::MAX).prop_map(Since::Seconds),
        (1i64..1_000_000).prop_map(Since::Seconds),
        timestamp().prop_map(|(t, o)| Since::Time(t, o)),
    ];
    (
        (
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
        ),
        prop::option::of(prop_oneof![any::<i64>(), -2i64..100]),
        prop::option::of(1i64..i64::MAX),
        prop::option::of(since),
        prop::collection::vec(
            (
                "[a-zA-Z]{1,12}".prop_filter("known keys", |k| {
                    ![
                        "follow",
                        "previous",
                        "timestamps",
                        "tailLines",
                        "limitBytes",
                        "sinceSeconds",
                        "sinceTime",
                    ]
                    .contains(&k.as_str())
                }),
                "[ -~]{0,8}",
            ),
            0..4,
        ),
        prop::collection::vec(any::<usize>(), 12),
        prop::collection::vec(any::<u8>(), 1..16),
    )
        .prop_map(
            |(
                (follow, previous, timestamps),
                tail_lines,
                limit_bytes,
                since,
                unknown,
                order,
                encoding,
            )| {
                Query {
                    follow,
                    previous,
                    timestamps,
                    tail_lines,
                    limit_bytes,
                    since,
                    unknown,
                    order,
                    encoding,
                }
            },
        )
}

impl Query {
    fn to_query_string(&self) -> String {
        let flag = |b: bool, i: usize| match (b, self.encoding[i % self.encoding.len()] % 3) {
            (true, 0) => "true",
            (true, 1) => "1",
            (true, _) => "True",
            (false, 0) => "false",
            (false, _) => "0",
        };
        let mut pairs: Vec<String> = Vec::new();
        let mut push = |k: &str, v: &str| {
            let i = pairs.len();
            pairs.push(format!(
                "{k}={}",
                encode(v, &self.encoding[i % self.encoding.len()..])
            ));
        };
        if let Some(b) = self.follow {
            push("follow", flag(b, 0));
        }
        if let Some(b) = self.previous {
            push("previous", flag(b, 1));
        }
        if let Some(b) = self.timestamps {
            push("timestamps", flag(b, 2));
        }
        if let Some(n) = self.tail_lines {
            push("tailLines", &n.to_string());
        }
        if let Some(n) = self.limit_bytes {
            push("limitBytes", &n.to_string());
        }
        match &self.since {
            Some(Since::Seconds(n)) => push("sinceSeconds", &n.to_string()),
            Some(Since::Time(t, offset)) => {
                let offset = Offset::from_seconds(*offset).unwrap_or(Offset::UTC);
                push("sinceTime", &t.display_with_offset(offset).to_string())
            }
            None => {}
        }
        for (k, v) in &self.unknown {
            push(k, v);
        }
        // Any order, with empty pairs (`a=1&&b=2`, a trailing `&`) that clients leave.
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, self.order[i % self.order.len()] % (i + 1));
        }
        if self.order[0].is_multiple_of(4) {
            pairs.insert(0, String::new());
        }
        if self.order[1].is_multiple_of(4) {
            pairs.push(String::new());
        }
        pairs.join("&")
    }
}

/// One CRI log line at `t`.
fn log_line(t: Timestamp, text: &str) -> String {
    format!("{t} stdout F {text}\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn log_options_parse_never_panics(query in "[ -~]{0,64}", now in 0u64..8_000_000_000) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
        if let Ok(o) = LogOptions::parse(&query, now) {
            prop_assert!(o.limit_bytes.is_none_or(|n| n > 0));
        }
    }

    #[test]
    fn log_options_parse_never_panics_on_log_like_queries(
        pieces in prop::collection::vec(prop_oneof![
            Just("&"), Just("="), Just("%"), Just("%2"), Just("%3A"), Just("%zz"), Just("+"),
            Just("%E2%82"), Just("%FF"), Just("-"), Just("9223372036854775807"), Just("0"),
            Just("follow"), Just("tailLines"), Just("limitBytes"), Just("sinceSeconds"),
            Just("sinceTime"), Just("2026-11-24T20:00:00Z"), Just("1"), Just("é"),
        ], 0..24),
    ) {
        let _ = LogOptions::parse(&pieces.concat(), SystemTime::now());
    }

    /// What a client asks for, however it orders and encodes the parameters, is what the
    /// kubelet API does: numbers as given (a negative tailLines is "all", a limitBytes or
    /// sinceSeconds that is not positive is refused), flags as given, `sinceTime` at the
    /// instant it names whatever its offset, `sinceSeconds` counted back from now.
    #[test]
    fn log_options_say_what_the_query_asked_for(q in query(), now in 0u64..8_000_000_000) {
        let text = q.to_query_string();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
        let got = LogOptions::parse(&text, now);
        if q.limit_bytes.is_some_and(|n| n <= 0) {
            prop_assert!(got.is_err(), "{text:?}: {got:?}");
            return Ok(());
        }
        let o = got.map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(o.follow, q.follow.unwrap_or(false), "{:?}", text);
        prop_assert_eq!(o.previous, q.previous.unwrap_or(false), "{:?}", text);
        prop_assert_eq!(o.timestamps, q.timestamps.unwrap_or(false), "{:?}", text);
        prop_assert_eq!(
            o.tail_lines,
            q.tail_lines.and_then(|n| u64::try_from(n).ok()),
            "{:?}", text
        );
        prop_assert_eq!(o.limit_bytes, q.limit_bytes.map(|n| n as u64), "{:?}", text);
        match q.since {
            None => prop_assert_eq!(o.since, None, "{:?}", text),
            Some(Since::Time(t, _)) => prop_assert_eq!(o.since, Some(t), "{:?}", text),
            Some(Since::Seconds(n)) => {
                let now = Timestamp::try_from(now).map_err(|e| TestCaseError::fail(e.to_string()))?;
                match now.checked_sub(SignedDuration::from_secs(n)) {
                    Ok(t) => prop_assert_eq!(o.since, Some(t), "{:?}", text),
                    // Before any time a log line can carry: nothing is left out.
                    Err(_) => prop_assert!(
                        o.since.is_none_or(|s| s == Timestamp::MIN),
                        "{text:?}: {:?}", o.since
                    ),
                }
            }
        }
    }

    /// A number parameter that is not an integer is refused, naming the parameter.
    #[test]
    fn log_options_refuse_non_integers(
        key in prop_oneof![Just("tailLines"), Just("limitBytes"), Just("sinceSeconds")],
        value in "[0-9]{0,3}[a-z.: ][0-9a-z]{0,3}",
    ) {
        let query = format!("{key}={}", encode(&value, &[0]));
        let got = LogOptions::parse(&query, SystemTime::now());
        let e = got.err().unwrap_or_default();
        prop_assert!(e.contains(key), "{query:?}: {e:?}");
    }

    /// What `kubectl logs` shows honours the options: never more than `tailLines` lines or
    /// `limitBytes` bytes, no line before `since`, and the lines it shows are the last ones.
    #[test]
    fn rendered_logs_honour_the_options(
        lines in prop::collection::vec((0i64..100, "[a-zé ]{0,12}"), 0..30),
        tail in prop::option::of(0u64..40),
        limit in prop::option::of(1u64..400),
        since in prop::option::of(0i64..100),
        timestamps in any::<bool>(),
    ) {
        let base = 1_795_550_400i64;
        let mut sorted = lines.clone();
        sorted.sort_by_key(|(s, _)| *s);
        let at = |s: i64| Timestamp::from_second(base + s).unwrap_or(Timestamp::UNIX_EPOCH);
        let file: String = sorted.iter().map(|(s, t)| log_line(at(*s), t)).collect();
        let o = LogOptions {
            timestamps,
            tail_lines: tail,
            limit_bytes: limit,
            since: since.map(at),
            ..LogOptions::default()
        };
        let out = render(&file, &o);
        let kept: Vec<String> = sorted
            .iter()
            .filter(|(s, _)| since.is_none_or(|since| *s >= since))
            .map(|(s, t)| if timestamps { format!("{} {t}\n", at(*s)) } else { format!("{t}\n") })
            .collect();
        let kept = &kept[kept.len() - tail.map_or(kept.len(), |n| (n as usize).min(kept.len()))..];
        let whole = kept.concat();
        prop_assert!(limit.is_none_or(|l| out.len() as u64 <= l), "{out:?}");
        prop_assert!(whole.starts_with(&out), "{out:?} is not the start of {whole:?}");
        if limit.is_none_or(|l| whole.len() as u64 <= l) {
            prop_assert_eq!(out, whole);
        } else {
            // Cut at the limit, on a character boundary.
            prop_assert!(limit.is_some_and(|l| l - out.len() as u64 <= 3), "{out:?}");
        }
    }

    /// The permission a request needs follows the kubelet's mapping: `/stats`, `/metrics`,
    /// `/logs` and `/spec` and the paths beneath them need their own subresource, every other
    /// path (`/containerLogs/...`, `/exec/...`, `/statsfoo`) needs `proxy`; a request that
    /// writes needs the verb that writes.
    #[test]
    fn attributes_follow_the_kubelet(m in method(), path in request_path()) {
        let (verb, sub) = attributes(&m, &path);
        prop_assert_eq!(sub, kubelet_subresource(&path), "{} {:?}", m, path);
        let want = match m {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "get",
        };
        prop_assert_eq!(verb, want, "{} {:?}", m, path);
        if path.trim_start_matches('/').starts_with("containerLogs") {
            prop_assert_eq!(sub, "proxy");
        }
    }
}

/// Found by `attributes_follow_the_kubelet`: a path that only begins with the name of a
/// narrower subresource is not beneath it, so it needs `proxy`, as the kubelet says.
#[test]
fn a_path_that_only_begins_like_stats_needs_proxy() {
    assert_eq!(attributes(&Method::GET, "/statsfoo"), ("get", "proxy"));
    assert_eq!(attributes(&Method::GET, "/logsX/a"), ("get", "proxy"));
    assert_eq!(attributes(&Method::GET, "/stats"), ("get", "stats"));
    assert_eq!(attributes(&Method::GET, "/stats/summary"), ("get", "stats"));
    assert_eq!(attributes(&Method::GET, "/logs/"), ("get", "log"));
}
