//! What a pushed binary is, read from its bytes with `wasmparser` (not wasmtime: this crate
//! must not depend on the runtime): a core module, a component (with the names of its
//! top-level imports and exports, for the config's `component` object), or neither.

use serde::{Deserialize, Serialize};
use wasmparser::{
    Chunk, ComponentExternalKind, ComponentTypeRef, Encoding, Parser, Payload, WasmFeatures,
};

/// The `component` object of the CNCF wasm config (`application/vnd.wasm.config.v0+json`).
///
/// Field names and meaning from the TAG Runtime "Wasm OCI Artifact layout"
/// (tag-runtime.cncf.io/wgs/wasm/deliverables/wasm-oci-artifact, source
/// github.com/cncf/tag-runtime website/content/.../wasm-oci-artifact/index.md), as
/// implemented by `oci-wasm` (github.com/bytecodealliance/rust-oci-wasm, src/component.rs),
/// which `wkg oci push` uses: `exports` and `imports` list the component's interface names
/// (`wasi:http/incoming-handler@0.2.0`) and top-level function names; `target` is
/// "optional metadata for indexing" naming the world (`wasi:http/proxy@0.2.0`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    /// The world the component targets, when known. A component binary does not record
    /// its world's name, so push leaves it out (it is optional in the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What the bytes of a `.wasm` are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WasmKind {
    /// A core WebAssembly module.
    Module,
    /// A component, with its top-level import and export names.
    Component(ComponentInfo),
    /// Neither (a header this parser does not know, or a component it cannot read); the text
    /// says why.
    Unknown(String),
}

/// Read what `bytes` are. Only the outer component's import and export sections are read;
/// nested core modules and components are skipped over, not parsed.
pub fn describe(bytes: &[u8]) -> WasmKind {
    match read(bytes) {
        Ok(k) => k,
        Err(e) => WasmKind::Unknown(e),
    }
}

fn read(bytes: &[u8]) -> Result<WasmKind, String> {
    let mut parser = Parser::new(0);
    // Every proposal on, so that a component using newer features (async, error-context)
    // still has its names read; this is a description, not validation.
    parser.set_features(WasmFeatures::all());
    let mut data = bytes;
    let mut info = ComponentInfo::default();
    loop {
        let (consumed, payload) = match parser.parse(data, true).map_err(|e| e.to_string())? {
            Chunk::Parsed { consumed, payload } => (consumed, payload),
            Chunk::NeedMoreData(_) => return Err("truncated".into()),
        };
        data = data.get(consumed..).ok_or("truncated")?;
        match payload {
            Payload::Version {
                encoding: Encoding::Module,
                ..
            } => return Ok(WasmKind::Module),
            // A nested module or component: its bytes follow and the outer parser has
            // already counted them, so step over them.
            Payload::ModuleSection {
                unchecked_range, ..
            }
            | Payload::ComponentSection {
                unchecked_range, ..
            } => {
                data = data.get(unchecked_range.len()..).ok_or("truncated")?;
            }
            Payload::ComponentImportSection(s) => {
                for i in s {
                    let i = i.map_err(|e| e.to_string())?;
                    if matches!(
                        i.ty,
                        ComponentTypeRef::Instance(_) | ComponentTypeRef::Func(_)
                    ) {
                        info.imports.push(i.name.name.to_string());
                    }
                }
            }
            Payload::ComponentExportSection(s) => {
                for e in s {
                    let e = e.map_err(|e| e.to_string())?;
                    if matches!(
                        e.kind,
                        ComponentExternalKind::Instance | ComponentExternalKind::Func
                    ) {
                        info.exports.push(e.name.name.to_string());
                    }
                }
            }
            Payload::End(_) => return Ok(WasmKind::Component(info)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(text: &str) -> ComponentInfo {
        match describe(&wat::parse_str(text).unwrap()) {
            WasmKind::Component(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn component_interfaces_and_functions_outer_level_only() {
        let c = component(
            r#"(component
                (import "wasi:cli/environment@0.2.0" (instance $env))
                (import "wasi:http/types@0.2.6" (instance $types))
                (import "log" (func $log))
                (import "a-type" (type (sub resource)))
                (core module $m (func (export "x")))
                (component $inner
                    (import "inner:only/iface@1.0.0" (instance))
                    (export "inner-export" (instance 0)))
                (instance $handler)
                (export "wasi:http/incoming-handler@0.2.6" (instance $handler))
                (export "run" (func $log))
                (export "inner-component" (component $inner))
            )"#,
        );
        assert_eq!(
            c.imports,
            ["wasi:cli/environment@0.2.0", "wasi:http/types@0.2.6", "log"]
        );
        assert_eq!(c.exports, ["wasi:http/incoming-handler@0.2.6", "run"]);
        assert_eq!(c.target, None);
    }

    #[test]
    fn module_component_and_neither() {
        assert_eq!(
            describe(&wat::parse_str(r#"(module (func (export "_start")))"#).unwrap()),
            WasmKind::Module
        );
        assert_eq!(
            describe(&wat::parse_str("(component)").unwrap()),
            WasmKind::Component(ComponentInfo::default())
        );
        assert!(matches!(describe(b"\0asm\x09\0\0\0"), WasmKind::Unknown(_)));
        assert!(matches!(describe(b"hello"), WasmKind::Unknown(_)));
        // a component cut short in its export section
        let full =
            wat::parse_str(r#"(component (import "f" (func $f)) (export "g" (func $f)))"#).unwrap();
        assert!(matches!(
            describe(&full[..full.len() - 2]),
            WasmKind::Unknown(_)
        ));
    }
}
