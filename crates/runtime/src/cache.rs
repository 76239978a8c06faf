//! Compiled modules kept on disk, keyed by content digest and by the engine's compatibility hash,
//! so a restart (or a second process) loads machine code instead of compiling again.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::{Engine, Module};

use crate::engine::RuntimeError;

/// A folder name that changes whenever precompiled artifacts would not load in this engine.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

fn artifact_path(dir: &Path, engine: &str, digest: &str) -> PathBuf {
    let name: String = digest
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(engine).join(format!("{name}.cwasm"))
}

/// Loads the module for `digest` from the disk cache, or compiles `bytes` (wasm or WAT) and stores
/// the artifact atomically for next time. A corrupt or stale artifact is recompiled, not trusted.
pub(crate) fn load_or_compile(
    engine: &Engine,
    dir: Option<&Path>,
    digest: &str,
    bytes: &[u8],
) -> Result<Module, RuntimeError> {
    let compile_err = |e: wasmtime::Error| RuntimeError::Compile {
        digest: digest.to_string(),
        reason: format!("{e:#}"),
    };
    let Some(dir) = dir else {
        return Module::new(engine, bytes).map_err(compile_err);
    };
    let path = artifact_path(dir, &engine_key(engine), digest);
    if path.exists() {
        // SAFETY: the file was written by `Engine::precompile_module` of an engine with the same
        // compatibility hash (it is in the path), into a cache folder only wasinode writes.
        match unsafe { Module::deserialize_file(engine, &path) } {
            Ok(m) => return Ok(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable precompiled module")
            }
        }
    }
    let artifact = engine.precompile_module(bytes).map_err(compile_err)?;
    if let Err(e) = write_atomically(&path, &artifact) {
        tracing::warn!(path = %path.display(), error = %e, "could not cache the precompiled module");
        // SAFETY: `artifact` was produced by this very engine a moment ago.
        return unsafe { Module::deserialize(engine, &artifact) }.map_err(compile_err);
    }
    // SAFETY: as above; loading from the file lets the kernel share the code pages.
    unsafe { Module::deserialize_file(engine, &path) }.map_err(compile_err)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for attempt in 0..100u32 {
        let p = dir.join(format!(".tmp-{}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}
