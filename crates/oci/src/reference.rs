//! Image references: one parser for the registry forms (`registry/repo:tag`,
//! `registry/repo@sha256:…`, Docker Hub short names) and the local forms of
//! standalone mode (`file:///abs/path.wasm`, `./x.wasm`, `/abs/x.wasm`, `x.wasm`).

use std::fmt;
use std::path::PathBuf;

pub use oci_client::Reference;

/// A parsed `image:` value: a local file (standalone mode) or a registry reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A module on the local file system.
    Local(PathBuf),
    /// A module in an OCI registry, normalized (`docker.io/library/` for short
    /// names, `:latest` when neither tag nor digest is given).
    Registry(Reference),
}

/// What is wrong with a reference or a pull policy string. Every variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("empty image reference")]
    Empty,
    #[error(
        "image reference {input:?}: a file:// reference needs an absolute path (file:///path/to/module.wasm)"
    )]
    FileNotAbsolute { input: String },
    #[error(
        "image reference {input:?}: registry references have no URL scheme; write HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]"
    )]
    Scheme { input: String },
    #[error("image reference {input:?}: {reason}")]
    Invalid { input: String, reason: String },
    #[error("pull policy {value:?} is not one of Always, IfNotPresent, Never")]
    Policy { value: String },
}

impl ImageRef {
    /// Parse an image reference.
    ///
    /// Local if: starts with `file://` (absolute path after it), `/`, `./` or `../`,
    /// or ends in `.wasm`/`.wat` with no `:` or `@`. Everything else parses as an OCI
    /// reference (`docker.io/library/` for short names; `:latest` default tag).
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        if s.trim().is_empty() {
            return Err(RefError::Empty);
        }
        if let Some(rest) = s.strip_prefix("file://") {
            // file:///abs/path or file://localhost/abs/path
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            if !rest.starts_with('/') {
                return Err(RefError::FileNotAbsolute {
                    input: s.to_string(),
                });
            }
            return Ok(ImageRef::Local(PathBuf::from(rest)));
        }
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") {
            return Ok(ImageRef::Local(PathBuf::from(s)));
        }
        if (s.ends_with(".wasm") || s.ends_with(".wat")) && !s.contains(':') && !s.contains('@') {
            return Ok(ImageRef::Local(PathBuf::from(s)));
        }
        parse_reference(s).map(ImageRef::Registry)
    }

    /// The registry reference, if this is one.
    pub fn as_registry(&self) -> Option<&Reference> {
        match self {
            ImageRef::Registry(r) => Some(r),
            ImageRef::Local(_) => None,
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Local(p) => write!(f, "file://{}", p.display()),
            ImageRef::Registry(r) => write!(f, "{r}"),
        }
    }
}

impl std::str::FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

/// Parse a registry reference (no local forms), with errors that say what is wrong.
pub fn parse_reference(s: &str) -> Result<Reference, RefError> {
    let invalid = |reason: &str| RefError::Invalid {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    if s.trim().is_empty() {
        return Err(RefError::Empty);
    }
    if s.contains("://") {
        return Err(RefError::Scheme {
            input: s.to_string(),
        });
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("contains whitespace"));
    }
    // The name is everything before the tag/digest; check the common mistakes
    // ourselves because the underlying parser only says "invalid reference format".
    let name_end = s.find('@').unwrap_or(s.len());
    let name = &s[..name_end];
    let name = match name.rfind(':') {
        Some(i) if !name[i + 1..].contains('/') => &name[..i],
        _ => name,
    };
    let (domain, path) = match name.split_once('/') {
        Some((d, p)) if d.contains('.') || d.contains(':') || d == "localhost" => (Some(d), p),
        _ => (None, name),
    };
    if name.is_empty() || path.is_empty() {
        return Err(invalid("missing repository name"));
    }
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(invalid("repository name must be lowercase"));
    }
    if let Some(d) = domain
        && let Some((_, port)) = d.rsplit_once(':')
        && !d.ends_with(']')
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(invalid(&format!("registry port {port:?} is not a number")));
    }
    if let Some((_, digest)) = s.split_once('@')
        && !digest.starts_with("sha256:")
        && !digest.starts_with("sha384:")
        && !digest.starts_with("sha512:")
    {
        return Err(invalid(&format!(
            "digest {digest:?} must be sha256:<64 hex digits>"
        )));
    }
    if let Some((_, digest)) = s.split_once('@')
        && let Some(hex) = digest.strip_prefix("sha256:")
        && (hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
    {
        return Err(invalid(&format!(
            "digest {digest:?} has the wrong length or characters (sha256 takes 64 lowercase hex digits)"
        )));
    }
    s.parse::<Reference>().map_err(|e| {
        use oci_client::ParseError as P;
        let reason = match e {
            P::DigestInvalidFormat => "digest must be ALGORITHM:HEX (sha256:<64 hex digits>)".into(),
            P::DigestInvalidLength => "digest has the wrong length (sha256 takes 64 hex digits)".into(),
            P::DigestUnsupported => "unsupported digest algorithm (use sha256)".into(),
            P::NameContainsUppercase => "repository name must be lowercase".into(),
            P::NameEmpty => "missing repository name".into(),
            P::NameTooLong => "repository name is longer than 255 characters".into(),
            P::TagInvalidFormat => "tag must be 1-128 of [A-Za-z0-9_.-], not starting with . or -".into(),
            other => format!("not a valid reference ({other}); expected [HOST[:PORT]/]REPOSITORY[:TAG|@sha256:DIGEST]"),
        };
        invalid(&reason)
    })
}

/// Pull policy as Kubernetes defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Resolve the reference at the registry on every pull (content already
    /// in the store is not downloaded again).
    Always,
    /// Use the store if it has the reference, pull otherwise.
    IfNotPresent,
    /// Use the store only; fail if the reference was never pulled.
    Never,
}

impl PullPolicy {
    /// `None` gives the Kubernetes default: `Always` for `:latest` or no tag,
    /// `IfNotPresent` otherwise (and for any reference with a digest).
    /// Accepts the Kubernetes spellings and, for the CLI, their lowercase forms.
    pub fn parse(s: Option<&str>, r: &Reference) -> Result<Self, RefError> {
        match s {
            None => Ok(Self::default_for(r)),
            Some(v) => match v.trim() {
                "Always" | "always" => Ok(PullPolicy::Always),
                "IfNotPresent" | "ifnotpresent" | "if-not-present" => Ok(PullPolicy::IfNotPresent),
                "Never" | "never" => Ok(PullPolicy::Never),
                _ => Err(RefError::Policy {
                    value: v.to_string(),
                }),
            },
        }
    }

    /// The Kubernetes default policy for a reference.
    pub fn default_for(r: &Reference) -> Self {
        if r.digest().is_some() {
            return PullPolicy::IfNotPresent;
        }
        match r.tag() {
            None | Some("latest") => PullPolicy::Always,
            Some(_) => PullPolicy::IfNotPresent,
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn reg(s: &str) -> Reference {
        match ImageRef::parse(s) {
            Ok(ImageRef::Registry(r)) => r,
            other => panic!("{s}: expected registry ref, got {other:?}"),
        }
    }

    #[test]
    fn local_forms() {
        for (s, p) in [
            ("file:///srv/m.wasm", "/srv/m.wasm"),
            ("file://localhost/srv/m.wasm", "/srv/m.wasm"),
            ("/srv/m.wasm", "/srv/m.wasm"),
            ("./m.wasm", "./m.wasm"),
            ("../x/m", "../x/m"),
            ("m.wasm", "m.wasm"),
            ("dir/m.wat", "dir/m.wat"),
        ] {
            assert_eq!(
                ImageRef::parse(s),
                Ok(ImageRef::Local(PathBuf::from(p))),
                "{s}"
            );
        }
        assert!(matches!(
            ImageRef::parse("file://rel/m.wasm"),
            Err(RefError::FileNotAbsolute { .. })
        ));
    }

    #[test]
    fn registry_forms() {
        let r = reg("127.0.0.1:5000/hello/wagi:v1");
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("127.0.0.1:5000", "hello/wagi", Some("v1"), None)
        );
        assert_eq!(r.to_string(), "127.0.0.1:5000/hello/wagi:v1");

        let r = reg(&format!("ghcr.io/o/m@{D}"));
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("ghcr.io", "o/m", None)
        );
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("ghcr.io/o/m@{D}"));

        let r = reg("hello");
        assert_eq!(r.to_string(), "docker.io/library/hello:latest");
        let r = reg("user/hello:1.0");
        assert_eq!(r.to_string(), "docker.io/user/hello:1.0");
        let r = reg("index.docker.io/user/hello");
        assert_eq!(r.to_string(), "docker.io/user/hello:latest");
        let r = reg("localhost/m");
        assert_eq!((r.registry(), r.repository()), ("localhost", "m"));
        let r = reg("localhost:5000/m:1.wasm");
        assert_eq!(r.tag(), Some("1.wasm"));
        // ":" makes a .wasm-looking string a reference
        let r = reg("reg.example:443/m.wasm");
        assert_eq!(
            (r.registry(), r.repository()),
            ("reg.example:443", "m.wasm")
        );
        let r = reg(&format!("r.io/m:v2@{D}"));
        assert_eq!((r.tag(), r.digest()), (Some("v2"), Some(D)));
    }

    #[test]
    fn errors_name_the_input() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("https://r.io/m:1", "no URL scheme"),
            ("r.io/Hello:1", "lowercase"),
            ("Hello", "lowercase"),
            ("r.io/m@sha256:abc", "wrong length"),
            ("r.io/m@md5:abc", "must be sha256"),
            ("r.io:abc/m:1", "port"),
            ("r.io/m:-bad", "r.io/m:-bad"),
            ("r.io/m:", "r.io/m:"),
            ("r.io/", "missing repository"),
            ("has space:1", "whitespace"),
        ];
        for (input, want) in cases {
            let e = ImageRef::parse(input).expect_err(input).to_string();
            assert!(e.contains(want), "{input:?}: {e}");
            if !input.trim().is_empty() {
                assert!(
                    e.contains(input),
                    "{input:?}: error does not name input: {e}"
                );
            }
        }
    }

    #[test]
    fn pull_policy_defaults() {
        let p = |s: &str| PullPolicy::parse(None, &reg(s)).unwrap();
        assert_eq!(p("r.io/m"), PullPolicy::Always);
        assert_eq!(p("r.io/m:latest"), PullPolicy::Always);
        assert_eq!(p("r.io/m:v1"), PullPolicy::IfNotPresent);
        assert_eq!(p(&format!("r.io/m@{D}")), PullPolicy::IfNotPresent);
        assert_eq!(p(&format!("r.io/m:latest@{D}")), PullPolicy::IfNotPresent);
        let r = reg("r.io/m:v1");
        assert_eq!(
            PullPolicy::parse(Some("Always"), &r),
            Ok(PullPolicy::Always)
        );
        assert_eq!(PullPolicy::parse(Some("Never"), &r), Ok(PullPolicy::Never));
        assert_eq!(
            PullPolicy::parse(Some("if-not-present"), &r),
            Ok(PullPolicy::IfNotPresent)
        );
        let e = PullPolicy::parse(Some("Sometimes"), &r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Sometimes"), "{e}");
    }
}
