//! Compiled modules kept on disk, keyed by content digest and by the engine's compatibility hash,
//! so a restart (or a second process) loads machine code instead of compiling again.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::engine::RuntimeError;

/// A folder name that changes whenever precompiled artifacts would not load in this engine.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

fn artifact_path(dir: &Path, engine: &str, digest: &str, component: bool) -> PathBuf {
    let name: String = digest
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let ext = if component {
        "component.cwasm"
    } else {
        "cwasm"
    };
    dir.join(engine).join(format!("{name}.{ext}"))
}

/// What the cache hands back: a core module or a component, as the bytes were.
pub(crate) enum Artifact {
    Module(Module),
    Component(Component),
}

/// Loads the program for `digest` from the disk cache, or compiles `bytes` (binary wasm or WAT
/// text: a core module or a component) and stores the artifact atomically for next time. A
/// corrupt or stale artifact is recompiled, not trusted. Modules and components are kept under
/// names of their own, so a hit needs nothing of `bytes`.
pub(crate) fn load_or_compile(
    engine: &Engine,
    dir: Option<&Path>,
    digest: &str,
    bytes: &[u8],
) -> Result<Artifact, RuntimeError> {
    let compile_err = |e: wasmtime::Error| RuntimeError::Compile {
        digest: digest.to_string(),
        reason: format!("{e:#}"),
    };
    // SAFETY (every deserialize below): the bytes were written by `Engine::precompile_*` of an
    // engine with the same compatibility hash (it is in the path), into a cache folder only
    // wasinode writes, or were produced by this very engine a moment ago.
    let from_file = |path: &Path, component: bool| -> wasmtime::Result<Artifact> {
        Ok(if component {
            Artifact::Component(unsafe { Component::deserialize_file(engine, path) }?)
        } else {
            Artifact::Module(unsafe { Module::deserialize_file(engine, path) }?)
        })
    };
    let paths = dir.map(|dir| {
        let key = engine_key(engine);
        (
            artifact_path(dir, &key, digest, false),
            artifact_path(dir, &key, digest, true),
        )
    });
    if let Some((module, component)) = &paths {
        for (path, is_component) in [(module, false), (component, true)] {
            if !path.exists() {
                continue;
            }
            match from_file(path, is_component) {
                Ok(a) => return Ok(a),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable precompiled program")
                }
            }
        }
    }
    // WAT text (tests, examples) becomes binary first, so its kind reads like a binary's.
    let binary = wat::parse_bytes(bytes).map_err(|e| RuntimeError::Compile {
        digest: digest.to_string(),
        reason: e.to_string(),
    })?;
    let component = crate::component::is_component_binary(&binary);
    let Some((module_path, component_path)) = paths else {
        return if component {
            Component::new(engine, &binary).map(Artifact::Component)
        } else {
            Module::new(engine, &binary).map(Artifact::Module)
        }
        .map_err(compile_err);
    };
    let path = if component {
        component_path
    } else {
        module_path
    };
    let artifact = if component {
        engine.precompile_component(&binary)
    } else {
        engine.precompile_module(&binary)
    }
    .map_err(compile_err)?;
    if let Err(e) = write_atomically(&path, &artifact) {
        tracing::warn!(path = %path.display(), error = %e, "could not cache the precompiled program");
        return if component {
            unsafe { Component::deserialize(engine, &artifact) }.map(Artifact::Component)
        } else {
            unsafe { Module::deserialize(engine, &artifact) }.map(Artifact::Module)
        }
        .map_err(compile_err);
    }
    // Loading from the file lets the kernel share the code pages.
    from_file(&path, component).map_err(compile_err)
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
