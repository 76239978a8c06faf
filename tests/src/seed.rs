//! The seed's demo (`shared/seed/wasi-node-pools.md`): its five krustlet-wagi-demo modules (built
//! from `examples/guests`) pushed to a local registry, and its `wasi-example.yaml` pod
//! (`examples/wasi-example.yaml`) pointed at that registry.

use anyhow::{Context, Result};

use crate::guests::{guest, repo_root};
use crate::registry::Registry;

/// The seed's five demo modules: (guest module, image name suffix).
pub const DEMOS: [(&str, &str); 5] = [
    ("hello", "hello"),
    ("index", "index"),
    ("log", "log"),
    ("error", "error"),
    ("http_example", "http-example"),
];

/// Builds the demo modules (so that the build is not counted in a test's timings).
pub fn build_demos() -> Result<()> {
    for (module, _) in DEMOS {
        guest(module)?;
    }
    Ok(())
}

/// `wasinode push`es each demo module as `<registry>/krustlet-wagi-demo-<x>:v1.0.0`; returns
/// (reference, manifest digest) pairs.
pub fn push_demos(registry: &Registry) -> Result<Vec<(String, String)>> {
    let dir = tempfile::tempdir()?;
    DEMOS
        .iter()
        .map(|(module, x)| {
            let reference = registry.image(&format!("krustlet-wagi-demo-{x}:v1.0.0"));
            let digest = crate::wasinode::push(&guest(module)?, &reference, dir.path(), &[])?;
            Ok((reference, digest))
        })
        .collect()
}

/// `examples/wasi-example.yaml` (the seed's pod with images at 127.0.0.1:5000 and default-host
/// `0.0.0.0:3001`) with `registry`'s address and `port`.
pub fn wasi_example(registry: &Registry, port: u16) -> Result<String> {
    let path = repo_root().join("examples/wasi-example.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(text
        .replace("127.0.0.1:5000/", &registry.image(""))
        .replace("0.0.0.0:3001", &format!("0.0.0.0:{port}")))
}
