//! Property tests for outbound allow-lists (`allowed_hosts` in the pod's modules annotation):
//! [`AllowList::parse`] on what a pod author writes, and [`AllowList::allows`] on the URLs a
//! guest asks for.

use proptest::prelude::*;
use runtime::AllowList;
use url::Url;

/// A host, with the spellings a URL may give it. Hosts of different groups are different
/// destinations.
struct Host {
    spellings: &'static [&'static str],
    /// A link-local or metadata address, reachable only through an entry that names it.
    restricted: bool,
    /// The address, for hosts that are one: an entry naming it makes it reachable under
    /// `insecure:allow-all`, however that entry spells it.
    address: Option<&'static str>,
}

const HOSTS: &[Host] = &[
    Host {
        spellings: &["api.example.com", "API.Example.COM", "api.exampl%65.com"],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &["evil.api.example.com"],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &["example.com", "EXAMPLE.com"],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &["localhost", "LocalHost"],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &[
            "127.0.0.1",
            "2130706433",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "127.1",
        ],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &["10.0.0.1", "10.1", "0xa000001"],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &["169.254.169.254", "0xa9.0xfe.0xa9.0xfe", "2852039166"],
        restricted: true,
        address: Some("169.254.169.254"),
    },
    Host {
        spellings: &["[::ffff:169.254.169.254]", "[::FFFF:a9fe:a9fe]"],
        restricted: true,
        address: Some("169.254.169.254"),
    },
    Host {
        spellings: &["[64:ff9b::169.254.169.254]", "[64:ff9b::a9fe:a9fe]"],
        restricted: true,
        address: Some("64:ff9b::a9fe:a9fe"),
    },
    Host {
        spellings: &["169.254.0.1", "169.254.1"],
        restricted: true,
        address: Some("169.254.0.1"),
    },
    Host {
        spellings: &["[::1]", "[0:0:0:0:0:0:0:1]", "[::0001]"],
        restricted: false,
        address: None,
    },
    Host {
        spellings: &["[fd00:ec2::254]", "[FD00:EC2:0:0:0:0:0:254]"],
        restricted: true,
        address: Some("fd00:ec2::254"),
    },
    Host {
        spellings: &["[fe80::1]", "[FE80::0:1]"],
        restricted: true,
        address: Some("fe80::1"),
    },
    Host {
        spellings: &["[2001:db8::1]", "[2001:DB8:0::1]"],
        restricted: false,
        address: None,
    },
];

fn spelling(host: usize, i: usize) -> &'static str {
    let s = HOSTS[host].spellings;
    s[i % s.len()]
}

/// A scheme as written: `http` or `https` (index 0 or 1) in any case.
fn scheme(which: bool, case: u8) -> String {
    let s = if which { "https" } else { "http" };
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if case >> (i % 8) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn default_port(https: bool) -> u16 {
    if https { 443 } else { 80 }
}

/// Everything but letters and digits as `%XX`, as userinfo must be written.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One origin (`scheme://host:port`) and how it is spelled.
#[derive(Debug, Clone)]
struct Origin {
    https: bool,
    case: u8,
    host: usize,
    spelling: usize,
    /// An explicit port (the scheme's default spelled out or another one), or none.
    port: Option<u16>,
}

impl Origin {
    fn port(&self) -> u16 {
        self.port.unwrap_or(default_port(self.https))
    }

    fn same_destination(&self, other: &Origin) -> bool {
        self.https == other.https && self.host == other.host && self.port() == other.port()
    }

    fn authority(&self) -> String {
        let host = spelling(self.host, self.spelling);
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }

    fn text(&self) -> String {
        format!("{}://{}", scheme(self.https, self.case), self.authority())
    }
}

fn origin() -> impl Strategy<Value = Origin> {
    (
        any::<bool>(),
        any::<u8>(),
        0..HOSTS.len(),
        any::<usize>(),
        prop_oneof![
            3 => Just(None),
            1 => Just(Some(80)),
            1 => Just(Some(443)),
            1 => Just(Some(8080)),
            1 => any::<u16>().prop_map(Some),
        ],
    )
        .prop_map(|(https, case, host, spelling, port)| Origin {
            https,
            case,
            host,
            spelling,
            port,
        })
}

/// Two origins that are often the same destination (spelled differently) and otherwise
/// differ in one or more of scheme, host and port.
fn two_origins() -> impl Strategy<Value = (Origin, Origin)> {
    (
        origin(),
        origin(),
        prop::collection::vec(prop::bool::weighted(0.3), 3),
    )
        .prop_map(|(a, b, change)| {
            let b = Origin {
                https: if change[0] { b.https } else { a.https },
                host: if change[1] { b.host } else { a.host },
                port: if change[2] { b.port } else { a.port },
                ..b
            };
            (a, b)
        })
}

/// What a URL may carry besides its origin: userinfo, path, query, fragment.
fn rest() -> impl Strategy<Value = (Option<(String, Option<String>)>, String)> {
    (
        prop::option::of(("[ -~]{0,8}", prop::option::of("[ -~]{0,8}"))),
        "(/[ -~]{0,12})?",
    )
}

fn url_of(o: &Origin, userinfo: &Option<(String, Option<String>)>, tail: &str) -> String {
    let userinfo = match userinfo {
        None => String::new(),
        Some((u, None)) => format!("{}@", pct(u)),
        Some((u, Some(p))) => format!("{}:{}@", pct(u), pct(p)),
    };
    let tail = if tail.is_empty() { "/" } else { tail };
    format!(
        "{}://{userinfo}{}{tail}",
        scheme(o.https, o.case),
        o.authority()
    )
}

fn parse_url(s: &str) -> Result<Url, TestCaseError> {
    Url::parse(s).map_err(|e| TestCaseError::fail(format!("{s:?}: {e}")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any entries are read or refused, never a panic; a refusal names the entry at fault,
    /// and every entry that is read allows the URL it is.
    #[test]
    fn parse_never_panics_and_entries_allow_themselves(
        entries in prop::collection::vec(
            prop_oneof![
                "[ -~]{0,24}",
                "\\PC{0,12}",
                "(https?|HTTP|ftp|file|data|insecure)://?[ -~]{0,16}",
                Just(" insecure:allow-all ".to_string()),
            ],
            0..4,
        ),
    ) {
        match AllowList::parse(&entries) {
            Ok(list) => {
                prop_assert_eq!(list.is_empty(), entries.is_empty());
                for e in &entries {
                    let e = e.trim();
                    if e == "insecure:allow-all" {
                        continue;
                    }
                    let url = parse_url(e)?;
                    prop_assert!(
                        list.allows(&url),
                        "{:?} does not allow its own URL {}", e, url
                    );
                }
            }
            Err(err) => {
                let named = entries.iter().any(|e| err.to_string().contains(&format!("{:?}", e.trim())));
                prop_assert!(named, "{err} names none of {entries:?}");
            }
        }
    }

    /// An entry `scheme://host[:port]` allows exactly the URLs with that scheme, host and
    /// port, however the URL spells them (case, the default port written out, IPv4 in hex,
    /// octal or as one number, IPv6 compressed or not) and whatever its userinfo, path,
    /// query and fragment; and what the entry itself carries besides its origin (userinfo,
    /// path, surrounding spaces) changes nothing.
    #[test]
    fn an_entry_allows_exactly_its_origin(
        (entry, url) in two_origins(),
        entry_rest in rest(),
        pad in "[ \t]{0,2}",
        url_rest in rest(),
    ) {
        let text = format!("{pad}{}{pad}", url_of(&entry, &entry_rest.0, &entry_rest.1));
        let text = if entry_rest == (None, String::new()) { format!("{pad}{}", entry.text()) } else { text };
        let list = AllowList::parse(&[&text])
            .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        let u = url_of(&url, &url_rest.0, &url_rest.1);
        let parsed = parse_url(&u)?;
        prop_assert_eq!(
            list.allows(&parsed),
            entry.same_destination(&url),
            "entry {:?}, url {:?} ({})", text, u, parsed
        );
    }

    /// Userinfo and the characters that end an authority do not move a URL to the host an
    /// entry names: the host is what comes after the last `@` of the authority, which ends
    /// at the first `/`, `\`, `?` or `#`.
    #[test]
    fn confusing_authorities_reach_the_host_they_name(
        (allowed, other) in two_origins(),
        form in 0u8..6,
    ) {
        let list = AllowList::parse(&[allowed.text()])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let s = scheme(other.https, other.case);
        let (a, b) = (allowed.authority(), other.authority());
        // Which origin the URL really goes to.
        let (u, goes_to) = match form {
            0 => (format!("{s}://{a}@{b}/"), &other),
            1 => (format!("{s}://{b}\\@{a}/"), &other),
            2 => (format!("{s}://{b}#@{a}/"), &other),
            3 => (format!("{s}://{b}?@{a}/"), &other),
            4 => (format!("{s}://{}@{b}/", pct(&format!("{a}/"))), &other),
            _ => (format!("{s}://{}@{}/", pct(&b), allowed.authority()), &Origin { https: other.https, ..allowed.clone() }),
        };
        let parsed = parse_url(&u)?;
        prop_assert_eq!(
            list.allows(&parsed),
            allowed.same_destination(goes_to),
            "entry {}, url {:?} ({})", allowed.text(), u, parsed
        );
    }

    /// `insecure:allow-all` allows every http and https URL except those to link-local and
    /// metadata addresses, which need an entry that names them.
    #[test]
    fn allow_all_allows_all_but_restricted_addresses(
        url in origin(),
        url_rest in rest(),
        named in prop::option::of(origin()),
    ) {
        let mut entries = vec!["insecure:allow-all".to_string()];
        entries.extend(named.as_ref().map(Origin::text));
        let list = AllowList::parse(&entries).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let u = url_of(&url, &url_rest.0, &url_rest.1);
        let parsed = parse_url(&u)?;
        let names_it = named
            .as_ref()
            .is_some_and(|n| n.host == url.host || HOSTS[n.host].address.is_some() && HOSTS[n.host].address == HOSTS[url.host].address);
        prop_assert_eq!(
            list.allows(&parsed),
            !HOSTS[url.host].restricted || names_it,
            "{:?} with {:?}", u, entries
        );
    }

    /// No other scheme is ever allowed, whatever the list.
    #[test]
    fn only_http_and_https_go_out(
        s in "(ftp|file|ws|wss|gopher|data|unix|javascript)",
        o in origin(),
        all in any::<bool>(),
    ) {
        let mut entries = vec![o.text()];
        if all {
            entries.push("insecure:allow-all".into());
        }
        let list = AllowList::parse(&entries).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(u) = Url::parse(&format!("{s}://{}/", o.authority())) {
            prop_assert!(!list.allows(&u), "{u}");
        }
    }
}
