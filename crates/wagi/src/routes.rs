//! Route patterns, the route table, and the `_routes` sub-route protocol.
//!
//! Patterns are matched against the request path *as sent* (still
//! percent-encoded, without the query). No normalisation is done here: a
//! path is matched byte for byte.

use std::collections::HashMap;

/// A declared route.
///
/// `"/x"` is exact; `"/x/..."` is a prefix that matches `"/x"` and
/// `"/x/anything"`, never `"/xy"`; `"/..."` matches everything.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RoutePattern {
    /// Matches exactly this raw path.
    Exact(String),
    /// The part before `"/..."`; `""` for `"/..."`.
    Prefix(String),
}

/// Errors about routes: declaring them, putting them in a table, or reading
/// a module's `_routes` output.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The pattern text is not a valid route.
    #[error("invalid route pattern {pattern:?}: {reason}")]
    Invalid { pattern: String, reason: String },
    /// The same pattern was declared twice.
    #[error("route {0:?} is declared more than once")]
    Duplicate(String),
    /// A line of `_routes` output could not be understood.
    #[error("line {line} of the module's _routes output: {reason}")]
    RoutesOutput { line: usize, reason: String },
}

fn invalid(pattern: &str, reason: impl Into<String>) -> RouteError {
    RouteError::Invalid {
        pattern: pattern.to_string(),
        reason: reason.into(),
    }
}

pub(crate) const PREFIX_SUFFIX: &str = "/...";

impl RoutePattern {
    /// Parses a declared route.
    ///
    /// It must start with `'/'`, contain no whitespace, control or non-ASCII
    /// characters (percent-encode them, as the request path would be), no
    /// `'?'` or `'#'`, no empty (`"//"`) or dot (`"."`, `".."`) segments, no
    /// malformed percent-escape, and `"..."` only as a final `"/..."` segment.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        if !s.starts_with('/') {
            return Err(invalid(s, "a route must start with '/'"));
        }
        if s.chars().any(char::is_whitespace) {
            return Err(invalid(s, "a route must not contain whitespace"));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid(s, "a route must not contain control characters"));
        }
        if !s.is_ascii() {
            return Err(invalid(
                s,
                "a route must be ASCII; percent-encode other characters as they appear in the request path",
            ));
        }
        if s.contains(['?', '#']) {
            return Err(invalid(
                s,
                "a route is a path only and must not contain '?' or '#'",
            ));
        }
        let (body, prefix) = match s.strip_suffix(PREFIX_SUFFIX) {
            Some(body) => (body, true),
            None => (s, false),
        };
        if body.contains("...") {
            return Err(invalid(
                s,
                "'...' may only appear as a final '/...' segment",
            ));
        }
        if s.contains("//") {
            return Err(invalid(
                s,
                "a route must not contain an empty segment ('//')",
            ));
        }
        if body.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(invalid(s, "a route must not contain '.' or '..' segments"));
        }
        check_percent_escapes(s)?;
        Ok(if prefix {
            RoutePattern::Prefix(body.to_string())
        } else {
            RoutePattern::Exact(body.to_string())
        })
    }

    /// The route as it was declared, e.g. `"/hello/..."`. This is
    /// `X_MATCHED_ROUTE`.
    pub fn as_declared(&self) -> String {
        match self {
            RoutePattern::Exact(p) => p.clone(),
            RoutePattern::Prefix(p) => format!("{p}{PREFIX_SUFFIX}"),
        }
    }

    /// The script name: `"/hello"` for both `"/hello"` and `"/hello/..."`;
    /// `""` for `"/..."`.
    pub fn script_name(&self) -> &str {
        match self {
            RoutePattern::Exact(p) | RoutePattern::Prefix(p) => p,
        }
    }

    /// Whether this pattern matches the raw (percent-encoded, query-less)
    /// request path.
    pub fn matches(&self, raw_path: &str) -> bool {
        self.path_info(raw_path).is_some()
    }

    /// The remainder of `raw_path` after the script name, if it matches.
    fn path_info<'p>(&self, raw_path: &'p str) -> Option<&'p str> {
        match self {
            RoutePattern::Exact(p) => (raw_path == p).then_some(""),
            RoutePattern::Prefix(p) => {
                let rest = raw_path.strip_prefix(p.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some(rest)
            }
        }
    }
}

impl std::fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_declared())
    }
}

fn check_percent_escapes(s: &str) -> Result<(), RouteError> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !ok {
                return Err(invalid(
                    s,
                    "malformed percent-escape ('%' must be followed by two hex digits)",
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// Routes mapped to values, looked up most-specific-first.
#[derive(Clone, Debug)]
pub struct RouteTable<T> {
    /// In insertion order.
    entries: Vec<(RoutePattern, T)>,
    /// Exact path -> index into `entries`.
    exact: HashMap<String, usize>,
    /// Prefix text -> index into `entries`.
    prefix: HashMap<String, usize>,
    /// Indices of prefix entries, longest prefix first.
    prefixes_by_len: Vec<usize>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of a successful [`RouteTable::lookup`].
#[derive(Debug)]
pub struct RouteMatch<'a, T> {
    pub value: &'a T,
    pub pattern: &'a RoutePattern,
    /// The remainder of the raw path after the script name (`""` or `"/a/b"`).
    pub raw_path_info: &'a str,
}

// Manual impls: a match is a bundle of references, copyable whatever `T` is.
impl<T> Clone for RouteMatch<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for RouteMatch<'_, T> {}

impl<T> RouteTable<T> {
    pub fn new() -> Self {
        RouteTable {
            entries: Vec::new(),
            exact: HashMap::new(),
            prefix: HashMap::new(),
            prefixes_by_len: Vec::new(),
        }
    }

    /// Adds a route. The same pattern twice is [`RouteError::Duplicate`].
    pub fn insert(&mut self, pattern: RoutePattern, value: T) -> Result<(), RouteError> {
        let index = self.entries.len();
        match &pattern {
            RoutePattern::Exact(p) => {
                if self.exact.contains_key(p) {
                    return Err(RouteError::Duplicate(pattern.as_declared()));
                }
                self.exact.insert(p.clone(), index);
            }
            RoutePattern::Prefix(p) => {
                if self.prefix.contains_key(p) {
                    return Err(RouteError::Duplicate(pattern.as_declared()));
                }
                self.prefix.insert(p.clone(), index);
                // Keep longest first; among equal lengths, insertion order
                // (equal-length distinct prefixes never both match a path).
                let at = self
                    .prefixes_by_len
                    .partition_point(|&i| prefix_len(&self.entries[i].0) >= p.len());
                self.prefixes_by_len.insert(at, index);
            }
        }
        self.entries.push((pattern, value));
        Ok(())
    }

    /// Most specific wins: exact beats prefix; longer prefix beats shorter.
    /// `raw_path` is the request's path as sent (percent-encoded, no query).
    ///
    /// The match borrows both the table and `raw_path` (its `raw_path_info`
    /// is a slice of `raw_path`).
    pub fn lookup<'a>(&'a self, raw_path: &'a str) -> Option<RouteMatch<'a, T>> {
        if let Some(&i) = self.exact.get(raw_path) {
            let (pattern, value) = &self.entries[i];
            return Some(RouteMatch {
                value,
                pattern,
                raw_path_info: "",
            });
        }
        for &i in &self.prefixes_by_len {
            let (pattern, value) = &self.entries[i];
            if let Some(rest) = pattern.path_info(raw_path) {
                return Some(RouteMatch {
                    value,
                    pattern,
                    raw_path_info: rest,
                });
            }
        }
        None
    }

    /// Iterates over routes in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&RoutePattern, &T)> {
        self.entries.iter().map(|(p, v)| (p, v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn prefix_len(p: &RoutePattern) -> usize {
    p.script_name().len()
}

/// One line of a module's `_routes` output.
///
/// A module may export `_routes`; running it prints lines
/// `"<pattern> <entrypoint>"` (entrypoint optional, meaning `"_start"`);
/// blank lines and surrounding whitespace are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubRoute {
    pub pattern: String,
    pub entrypoint: String,
}

/// The entrypoint used when a `_routes` line names none.
pub const DEFAULT_ENTRYPOINT: &str = "_start";

/// Parses the stdout of a module's `_routes` export. Each pattern is
/// checked with [`RoutePattern::parse`]; an error names the (1-based) line
/// number and why.
pub fn parse_routes_output(stdout: &str) -> Result<Vec<SubRoute>, RouteError> {
    let mut out = Vec::new();
    for (index, line) in stdout.lines().enumerate() {
        let line_no = index + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (pattern, entrypoint) = match fields.as_slice() {
            [] => continue,
            [pattern] => (*pattern, DEFAULT_ENTRYPOINT),
            [pattern, entrypoint] => (*pattern, *entrypoint),
            more => {
                return Err(RouteError::RoutesOutput {
                    line: line_no,
                    reason: format!(
                        "expected '<pattern> [entrypoint]' but found {} fields in {:?}",
                        more.len(),
                        line.trim()
                    ),
                });
            }
        };
        if let Err(e) = RoutePattern::parse(pattern) {
            let reason = match e {
                RouteError::Invalid { pattern, reason } => {
                    format!("invalid route pattern {pattern:?}: {reason}")
                }
                other => other.to_string(),
            };
            return Err(RouteError::RoutesOutput {
                line: line_no,
                reason,
            });
        }
        out.push(SubRoute {
            pattern: pattern.to_string(),
            entrypoint: entrypoint.to_string(),
        });
    }
    Ok(out)
}

/// Joins a module's route with a sub-route from `_routes`.
///
/// With parent `"/foo"` or `"/foo/..."`: sub `"/bar"` gives `"/foo/bar"`,
/// sub `"/bar/..."` gives `"/foo/bar/..."`. With parent `"/..."`: sub
/// `"/bar"` gives `"/bar"`. A sub-route of `"/"` gives the parent's script
/// name itself (`"/foo"`, or `"/"` under `"/..."`), and `"/..."` gives
/// `"/foo/..."`.
pub fn join(parent: &RoutePattern, sub: &str) -> Result<RoutePattern, RouteError> {
    // Validate the sub-route on its own first, so its errors name it.
    let sub_pattern = RoutePattern::parse(sub)?;
    let base = parent.script_name().trim_end_matches('/');
    let joined = match &sub_pattern {
        RoutePattern::Exact(p) if p == "/" => {
            if base.is_empty() {
                "/".to_string()
            } else {
                base.to_string()
            }
        }
        _ => format!("{base}{sub}"),
    };
    RoutePattern::parse(&joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RoutePattern {
        RoutePattern::parse(s).expect("valid pattern in test")
    }

    fn table(patterns: &[&str]) -> RouteTable<String> {
        let mut t = RouteTable::new();
        for s in patterns {
            t.insert(p(s), (*s).to_string()).expect("no duplicate");
        }
        t
    }

    fn hit(t: &RouteTable<String>, path: &str) -> Option<(String, String)> {
        t.lookup(path)
            .map(|m| (m.value.clone(), m.raw_path_info.to_string()))
    }

    #[test]
    fn parse_forms() {
        assert_eq!(p("/hello"), RoutePattern::Exact("/hello".into()));
        assert_eq!(p("/hello/..."), RoutePattern::Prefix("/hello".into()));
        assert_eq!(p("/..."), RoutePattern::Prefix("".into()));
        assert_eq!(p("/"), RoutePattern::Exact("/".into()));
        assert_eq!(p("/a/b/"), RoutePattern::Exact("/a/b/".into()));
        assert_eq!(p("/a%20b"), RoutePattern::Exact("/a%20b".into()));
        assert_eq!(p("/file.txt"), RoutePattern::Exact("/file.txt".into()));
    }

    #[test]
    fn declared_and_script_name() {
        for s in ["/hello", "/hello/...", "/...", "/", "/a/b/..."] {
            assert_eq!(p(s).as_declared(), s);
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(p("/hello").script_name(), "/hello");
        assert_eq!(p("/hello/...").script_name(), "/hello");
        assert_eq!(p("/...").script_name(), "");
    }

    #[test]
    fn malformed_routes() {
        for bad in [
            "",
            "hello",
            "hello/...",
            "/hel lo",
            "/hello\t",
            "/a\u{7}",
            "/q?x=1",
            "/frag#x",
            "/a/.../b",
            "/a...",
            "/...x",
            "/a/b...",
            "/.../...",
            "//a",
            "/a//b",
            "/a//...",
            "/a/../b",
            "/./a",
            "/a/..",
            "/caf\u{e9}",
            "/a%2",
            "/a%zz",
            "...",
        ] {
            match RoutePattern::parse(bad) {
                Err(RouteError::Invalid { pattern, reason }) => {
                    assert_eq!(pattern, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} should be invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_error_message_names_pattern_and_reason() {
        let e = RoutePattern::parse("/a b").unwrap_err().to_string();
        assert!(e.contains("\"/a b\""), "{e}");
        assert!(e.contains("whitespace"), "{e}");
    }

    #[test]
    fn prefix_matches_itself_and_below_but_not_siblings() {
        let hello = p("/hello/...");
        assert!(hello.matches("/hello"));
        assert!(hello.matches("/hello/"));
        assert!(hello.matches("/hello/a"));
        assert!(hello.matches("/hello/a/b"));
        assert!(!hello.matches("/helloworld"));
        assert!(!hello.matches("/hell"));
        assert!(!hello.matches("/"));
        assert!(!hello.matches("/other/hello"));
    }

    #[test]
    fn exact_matches_only_itself() {
        let hello = p("/hello");
        assert!(hello.matches("/hello"));
        assert!(!hello.matches("/hello/"));
        assert!(!hello.matches("/hello/a"));
        assert!(!hello.matches("/Hello"));
    }

    #[test]
    fn catch_all_matches_everything() {
        let all = p("/...");
        for path in ["/", "/a", "/a/b", "/a%20b", ""] {
            assert!(all.matches(path), "{path}");
        }
    }

    #[test]
    fn hand_built_variants_do_not_panic() {
        // The enum's fields are public, so odd values can be built directly.
        let odd = RoutePattern::Prefix("é".into());
        assert!(!odd.matches("/"));
        assert!(odd.matches("é/x"));
        assert!(!RoutePattern::Exact(String::new()).matches("/"));
    }

    #[test]
    fn lookup_prefix_serves_root_and_below_not_siblings() {
        let t = table(&["/hello/..."]);
        assert_eq!(hit(&t, "/hello"), Some(("/hello/...".into(), "".into())));
        assert_eq!(
            hit(&t, "/hello/a"),
            Some(("/hello/...".into(), "/a".into()))
        );
        assert_eq!(
            hit(&t, "/hello/a/b%20c"),
            Some(("/hello/...".into(), "/a/b%20c".into()))
        );
        assert_eq!(hit(&t, "/helloworld"), None);
        assert_eq!(hit(&t, "/"), None);
    }

    #[test]
    fn lookup_exact_beats_prefix() {
        let t = table(&["/hello/...", "/hello"]);
        assert_eq!(hit(&t, "/hello"), Some(("/hello".into(), "".into())));
        assert_eq!(
            hit(&t, "/hello/x"),
            Some(("/hello/...".into(), "/x".into()))
        );
        // Insertion order must not matter.
        let t = table(&["/hello", "/hello/..."]);
        assert_eq!(hit(&t, "/hello"), Some(("/hello".into(), "".into())));
    }

    #[test]
    fn lookup_longer_prefix_wins() {
        let t = table(&["/...", "/a/...", "/a/b/..."]);
        assert_eq!(hit(&t, "/a/b/c"), Some(("/a/b/...".into(), "/c".into())));
        assert_eq!(hit(&t, "/a/b"), Some(("/a/b/...".into(), "".into())));
        assert_eq!(hit(&t, "/a/bc"), Some(("/a/...".into(), "/bc".into())));
        assert_eq!(hit(&t, "/a"), Some(("/a/...".into(), "".into())));
        assert_eq!(hit(&t, "/ab"), Some(("/...".into(), "/ab".into())));
        let t = table(&["/a/b/...", "/a/...", "/..."]);
        assert_eq!(hit(&t, "/a/b/c"), Some(("/a/b/...".into(), "/c".into())));
    }

    #[test]
    fn lookup_catch_all() {
        let t = table(&["/...", "/x"]);
        assert_eq!(hit(&t, "/"), Some(("/...".into(), "/".into())));
        assert_eq!(hit(&t, "/y/z"), Some(("/...".into(), "/y/z".into())));
        assert_eq!(hit(&t, "/x"), Some(("/x".into(), "".into())));
        let m = t.lookup("/y").expect("catch-all");
        assert_eq!(m.pattern.script_name(), "");
    }

    #[test]
    fn lookup_no_match() {
        let t = table(&["/a", "/b/..."]);
        assert!(t.lookup("/c").is_none());
        assert!(t.lookup("/a/").is_none());
        assert!(t.lookup("").is_none());
        assert!(RouteTable::<()>::new().lookup("/").is_none());
    }

    #[test]
    fn duplicates_rejected_and_table_accessors() {
        let mut t = RouteTable::new();
        assert!(t.is_empty());
        t.insert(p("/a"), 1).expect("first");
        t.insert(p("/a/..."), 2)
            .expect("prefix of same name is distinct");
        match t.insert(p("/a"), 3) {
            Err(RouteError::Duplicate(s)) => assert_eq!(s, "/a"),
            other => panic!("expected duplicate, got {other:?}"),
        }
        match t.insert(p("/a/..."), 4) {
            Err(RouteError::Duplicate(s)) => assert_eq!(s, "/a/..."),
            other => panic!("expected duplicate, got {other:?}"),
        }
        assert_eq!(t.len(), 2);
        let listed: Vec<(String, i32)> = t.iter().map(|(p, v)| (p.as_declared(), *v)).collect();
        assert_eq!(listed, vec![("/a".into(), 1), ("/a/...".into(), 2)]);
        assert_eq!(*t.lookup("/a").expect("hit").value, 1);
    }

    #[test]
    fn routes_output_parsing() {
        let out = "\n  /foo   handle_foo  \r\n/bar/...\n\n\t/baz _start\n   \n";
        let subs = parse_routes_output(out).expect("valid");
        assert_eq!(
            subs,
            vec![
                SubRoute {
                    pattern: "/foo".into(),
                    entrypoint: "handle_foo".into()
                },
                SubRoute {
                    pattern: "/bar/...".into(),
                    entrypoint: "_start".into()
                },
                SubRoute {
                    pattern: "/baz".into(),
                    entrypoint: "_start".into()
                },
            ]
        );
        assert!(parse_routes_output("").expect("empty ok").is_empty());
        assert!(parse_routes_output("\n \n").expect("blank ok").is_empty());
    }

    #[test]
    fn routes_output_errors_name_line_and_reason() {
        match parse_routes_output("/ok\n\n/a b c\n") {
            Err(RouteError::RoutesOutput { line, reason }) => {
                assert_eq!(line, 3);
                assert!(reason.contains("3 fields"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match parse_routes_output("/ok\nnot-a-route entry\n") {
            Err(e @ RouteError::RoutesOutput { line: 2, .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("line 2"), "{msg}");
                assert!(msg.contains("must start with '/'"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_routes_output("/x?y f"),
            Err(RouteError::RoutesOutput { line: 1, .. })
        ));
    }

    #[test]
    fn join_rules() {
        let j = |parent: &str, sub: &str| join(&p(parent), sub).map(|r| r.as_declared());
        assert_eq!(j("/foo", "/bar").expect("ok"), "/foo/bar");
        assert_eq!(j("/foo/...", "/bar").expect("ok"), "/foo/bar");
        assert_eq!(j("/foo", "/bar/...").expect("ok"), "/foo/bar/...");
        assert_eq!(j("/foo/...", "/bar/...").expect("ok"), "/foo/bar/...");
        assert_eq!(j("/...", "/bar").expect("ok"), "/bar");
        assert_eq!(j("/...", "/bar/...").expect("ok"), "/bar/...");
        assert_eq!(j("/", "/bar").expect("ok"), "/bar");
        assert_eq!(j("/foo", "/").expect("ok"), "/foo");
        assert_eq!(j("/...", "/").expect("ok"), "/");
        assert_eq!(j("/foo/...", "/...").expect("ok"), "/foo/...");
        assert_eq!(j("/...", "/...").expect("ok"), "/...");
        assert_eq!(j("/foo/", "/bar").expect("ok"), "/foo/bar");
        assert!(matches!(j("/foo", "bar"), Err(RouteError::Invalid { .. })));
        assert!(matches!(j("/foo", "/b r"), Err(RouteError::Invalid { .. })));
    }
}
