//! The node's labels and taints as `--node-labels` and `--register-with-taints` take them:
//! parsing, the checks the API server applies to label keys and values, and which labels
//! NodeRestriction lets a node set on itself.

use serde_json::{Value, json};

use crate::register::ARCH;

/// A taint as `--register-with-taints` takes it: `key=value:Effect` or `key:Effect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintSpec {
    pub key: String,
    pub value: Option<String>,
    pub effect: String,
}

impl TaintSpec {
    pub fn to_json(&self) -> Value {
        let mut t = json!({"key": self.key, "effect": self.effect});
        if let Some(v) = &self.value {
            t["value"] = json!(v);
        }
        t
    }
}

impl std::fmt::Display for TaintSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}:{}", self.key, v, self.effect),
            None => write!(f, "{}:{}", self.key, self.effect),
        }
    }
}

/// The seed's taints: `kubernetes.io/arch=wasm32-wagi` with `NoSchedule` and `NoExecute`.
pub fn default_taints() -> Vec<TaintSpec> {
    ["NoSchedule", "NoExecute"]
        .into_iter()
        .map(|effect| TaintSpec {
            key: "kubernetes.io/arch".into(),
            value: Some(ARCH.into()),
            effect: effect.into(),
        })
        .collect()
}

/// Whether `name` is a DNS-1123 label-ish name part of a label key or a label value: at most
/// 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn valid_name(name: &str) -> bool {
    name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks a label (or taint) key: `[prefix/]name`, prefix a DNS subdomain.
pub fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if !valid_name(name) {
        return Err(format!(
            "{key:?}: the name part must be 1-63 characters of [A-Za-z0-9._-], starting and \
             ending with a letter or digit"
        ));
    }
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "{key:?}: the prefix must be a lowercase DNS subdomain (example.com/)"
            ));
        }
    }
    Ok(())
}

/// Checks a label (or taint) value: empty, or as a key's name part.
pub fn check_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || valid_name(value) {
        Ok(())
    } else {
        Err(format!(
            "{key}={value}: a value must be at most 63 characters of [A-Za-z0-9._-], starting \
             and ending with a letter or digit"
        ))
    }
}

/// Labels in the `kubernetes.io` and `k8s.io` namespaces that NodeRestriction lets a node set
/// on itself (as the kubelet's `--node-labels` allows them).
const NODE_SETTABLE: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/arch",
    "kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
];

/// Whether NodeRestriction lets a node set label `key` on its own Node.
pub fn node_may_set(key: &str) -> bool {
    let Some((prefix, _)) = key.rsplit_once('/') else {
        return true;
    };
    let reserved = |ns: &str| prefix == ns || prefix.ends_with(&format!(".{ns}"));
    if !reserved("kubernetes.io") && !reserved("k8s.io") {
        return true;
    }
    NODE_SETTABLE.contains(&key)
        || ["kubelet.kubernetes.io", "node.kubernetes.io"]
            .iter()
            .any(|ns| reserved(ns))
}

/// Parses `--node-labels`: `key=value,key2=value2` (empty: none).
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected key=value"))?;
        check_key(k)?;
        if !node_may_set(k) {
            return Err(format!(
                "{k:?}: NodeRestriction does not let a node set labels in the kubernetes.io and \
                 k8s.io namespaces other than kubelet.kubernetes.io/, node.kubernetes.io/ and \
                 the well-known ones; an admin can set it with `kubectl label node`"
            ));
        }
        check_value(k, v)?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Parses `--register-with-taints`: `key=value:Effect,key2:Effect` (empty: no taints).
pub fn parse_taints(text: &str) -> Result<Vec<TaintSpec>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (kv, effect) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("{item:?}: expected key=value:Effect or key:Effect"))?;
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(format!(
                "{item:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute, not \
                 {effect:?}"
            ));
        }
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (kv, None),
        };
        check_key(key).map_err(|e| format!("{item:?}: {e}"))?;
        if let Some(v) = value {
            check_value(key, v).map_err(|e| format!("{item:?}: {e}"))?;
        }
        if out
            .iter()
            .any(|t: &TaintSpec| t.key == key && t.effect == effect)
        {
            return Err(format!(
                "{item:?}: a taint with key {key:?} and effect {effect} is already given (taints \
                 must be unique by key and effect)"
            ));
        }
        out.push(TaintSpec {
            key: key.to_string(),
            value: value.filter(|v| !v.is_empty()).map(str::to_string),
            effect: effect.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_labels() {
        assert_eq!(
            parse_labels("a=b, example.com/tier=edge,empty=").unwrap(),
            [
                ("a".to_string(), "b".to_string()),
                ("example.com/tier".into(), "edge".into()),
                ("empty".into(), String::new())
            ]
        );
        assert_eq!(parse_labels("").unwrap(), []);
        let e = parse_labels("a=b,oops").unwrap_err();
        assert!(e.contains("oops"), "{e}");
        let e = parse_labels("bad key=x").unwrap_err();
        assert!(e.contains("bad key"), "{e}");
        let e = parse_labels("k=not ok").unwrap_err();
        assert!(e.contains("not ok"), "{e}");
        assert!(parse_labels("Upper.Case/x=y").is_err());
        let e = parse_labels("node-role.kubernetes.io/worker=").unwrap_err();
        assert!(e.contains("NodeRestriction"), "{e}");
        assert!(parse_labels("node.kubernetes.io/pool=a,kubelet.kubernetes.io/x=y").is_ok());
        assert!(parse_labels("topology.kubernetes.io/zone=z1,example.com/k8s.io=x").is_ok());
        assert!(parse_labels("k8s.io/x=y").is_err());
    }

    #[test]
    fn parses_taints() {
        let t =
            parse_taints("kubernetes.io/arch=wasm32-wagi:NoSchedule,dedicated:NoExecute").unwrap();
        assert_eq!(t[0], default_taints()[0]);
        assert_eq!(t[1].key, "dedicated");
        assert_eq!(t[1].value, None);
        assert_eq!(t[1].to_string(), "dedicated:NoExecute");
        assert_eq!(parse_taints("").unwrap(), []);
        let e = parse_taints("a=b:NoSchedule,c=d:Never").unwrap_err();
        assert!(e.contains("c=d:Never") && e.contains("Never"), "{e}");
        let e = parse_taints("a=b:NoSchedule,a=c:NoSchedule").unwrap_err();
        assert!(e.contains("a=c:NoSchedule") && e.contains("unique"), "{e}");
        assert!(parse_taints("a=b:NoSchedule,a=b:NoExecute").is_ok());
        let e = parse_taints("novalue").unwrap_err();
        assert!(e.contains("novalue"), "{e}");
    }
}
