//! Reading Pod manifests from YAML files (several documents per file).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {index}: {reason}")]
    Parse {
        path: PathBuf,
        index: usize,
        reason: String,
    },
}

/// A pod and the folder of the file it came from (relative images resolve against it).
#[derive(Debug, Clone)]
pub struct ManifestPod {
    pub pod: Pod,
    pub base_dir: PathBuf,
}

/// Reads every `kind: Pod` document of `path`. Other kinds are returned as warnings. Pods without
/// a uid get a stable one derived from namespace and name (so their logs keep their place).
pub fn load(path: &Path) -> Result<(Vec<ManifestPod>, Vec<String>), ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.into(),
        source,
    })?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base_dir = std::fs::canonicalize(&base_dir).unwrap_or(base_dir);
    let mut pods = Vec::new();
    let mut warnings = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ManifestError::Parse {
            path: path.into(),
            index,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "Pod" {
            warnings.push(format!(
                "{}: document {index}: kind {kind:?} is not a Pod; skipped",
                path.display()
            ));
            continue;
        }
        let mut pod: Pod = serde_yaml::from_value(value).map_err(|e| ManifestError::Parse {
            path: path.into(),
            index,
            reason: e.to_string(),
        })?;
        let ns = pod
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into())
            .clone();
        if pod.metadata.uid.is_none() {
            let mut h = DefaultHasher::new();
            (&ns, &pod.metadata.name).hash(&mut h);
            pod.metadata.uid = Some(format!("local-{:016x}", h.finish()));
        }
        pods.push(ManifestPod {
            pod,
            base_dir: base_dir.clone(),
        });
    }
    Ok((pods, warnings))
}
