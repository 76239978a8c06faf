//! The guest WebAssembly modules the tests run.
//!
//! Rust guests live in `examples/guests/<name>.rs` and are built by `tools/build-guests` (Debian's
//! rustc 1.63 with the wasm32-wasi std, installed by `tools/setup`) into `target/guests/<name>.wasm`;
//! the script keeps a content-addressed cache, so after the first build a run only copies files.
//! Hand-written WAT modules live in `examples/wat/<name>.wat` and are loaded as text by the runtime.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};

/// The repository root (the parent of this crate's directory, `tests/`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Builds every Rust guest (once per process; later calls reuse the first outcome) and returns
/// the directory holding `<name>.wasm`. A failed build is returned as an error carrying the
/// script's output.
pub fn guests() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build).clone().map_err(|e| anyhow!(e))
}

fn build() -> Result<PathBuf, String> {
    run_build_script("tools/build-guests", "target/guests")
}

/// Runs a build script of the repo (`tools/...`) and returns `out` under the repo root; a failed
/// build is the script's output.
fn run_build_script(script: &str, out: &str) -> Result<PathBuf, String> {
    let root = repo_root();
    let script = root.join(script);
    let res = Command::new("bash")
        .arg(&script)
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !res.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            res.status,
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr),
        ));
    }
    Ok(root.join(out))
}

/// Path to the built Rust guest `<name>.wasm` (building the guests first if needed).
pub fn guest(name: &str) -> anyhow::Result<PathBuf> {
    let dir = guests()?;
    let path = dir.join(format!("{name}.wasm"));
    if !path.is_file() {
        let have: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".wasm"))
                    .map(String::from)
            })
            .collect();
        bail!(
            "no guest module {name:?}: {} does not exist (built: {}; is there an examples/guests/{name}.rs?)",
            path.display(),
            have.join(", ")
        );
    }
    Ok(path)
}

/// Path to the hand-written WAT module `examples/wat/<name>.wat` (not checked for existence).
pub fn wat(name: &str) -> PathBuf {
    repo_root().join("examples/wat").join(format!("{name}.wat"))
}

/// Builds every component guest (once per process) with `tools/build-components` and returns the
/// directory holding `<name>.wasm` (`target/components`). Sources and toolchains: see the script.
pub fn components() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| run_build_script("tools/build-components", "target/components"))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Path to the built component `<name>.wasm` (building the components first if needed).
pub fn component(name: &str) -> anyhow::Result<PathBuf> {
    let path = components()?.join(format!("{name}.wasm"));
    if !path.is_file() {
        bail!(
            "no component {name:?}: {} does not exist (is it in tools/build-components?)",
            path.display()
        );
    }
    Ok(path)
}
