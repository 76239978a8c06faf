//! Preview-1 `environ_sizes_get` and `environ_get` from one prepared buffer.
//!
//! wasmtime-wasi's own pair clones the whole environment (every name and value as a `String`)
//! on each call, and a guest calls both at start: with a WAGI request's 26 CGI variables that was
//! about a hundred allocations and frees per request on top of the copy the context builder
//! makes, a fifth of the instantiate-and-run bench's time. These shadow the two functions in the
//! Linker: the store's [`Environ`] holds the variables once, laid out as the guest receives them
//! (`NAME=value\0` after one another), and `environ_get` copies that buffer and writes the
//! pointers into the guest's memory. wasmtime-wasi's context gets no environment, so nothing
//! else reads it twice. Only an unshared memory is written: the pooling allocator refuses a
//! module with a shared one.

use wasmtime::{Caller, Extern, Linker};

use crate::run::Host;

const MODULE: &str = "wasi_snapshot_preview1";
/// `errno::success`.
const SUCCESS: i32 = 0;
/// `errno::fault`: a pointer outside the guest's memory.
const FAULT: i32 = 21;
/// `errno::overflow`: more than a 32-bit guest can address.
const OVERFLOW: i32 = 61;

/// A guest's environment, as `environ_get` hands it over.
#[derive(Debug, Default, Clone)]
pub struct Environ {
    /// `NAME=value\0` for every variable, in order.
    buf: Vec<u8>,
    /// Where each variable starts in `buf`.
    starts: Vec<u32>,
}

impl Environ {
    /// The environment of `vars`, in order.
    pub fn new(vars: &[(String, String)]) -> Environ {
        let len = vars.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut env = Environ {
            buf: Vec::with_capacity(len),
            starts: Vec::with_capacity(vars.len()),
        };
        for (k, v) in vars {
            env.push(k, v);
        }
        env
    }

    fn push(&mut self, name: &str, value: &str) {
        // A variable past 4 GiB cannot reach a 32-bit guest; `sizes` reports the overflow.
        self.starts
            .push(u32::try_from(self.buf.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b'=');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
    }

    /// `(count, bytes)` as `environ_sizes_get` reports them, if they fit in 32 bits.
    fn sizes(&self) -> Option<(u32, u32)> {
        Some((
            u32::try_from(self.starts.len()).ok()?,
            u32::try_from(self.buf.len()).ok()?,
        ))
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let defined = define(linker);
    linker.allow_shadowing(false);
    defined
}

fn define(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut caller: Caller<'_, Host>, count: i32, size: i32| -> i32 {
            let Some((n, bytes)) = caller.data().env.sizes() else {
                return OVERFLOW;
            };
            let mut out = [0u8; 4];
            out.copy_from_slice(&n.to_le_bytes());
            if !write(&mut caller, count as u32, &out) {
                return FAULT;
            }
            out.copy_from_slice(&bytes.to_le_bytes());
            if !write(&mut caller, size as u32, &out) {
                return FAULT;
            }
            SUCCESS
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |mut caller: Caller<'_, Host>, environ: i32, buf: i32| -> i32 {
            environ_get(&mut caller, environ as u32, buf as u32)
        },
    )?;
    Ok(())
}

fn environ_get(caller: &mut Caller<'_, Host>, environ: u32, buf: u32) -> i32 {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return FAULT;
    };
    let (data, host) = mem.data_and_store_mut(caller);
    let env = &host.env;
    if env.sizes().is_none() {
        return OVERFLOW;
    }
    let strings = buf as usize;
    let pointers = environ as usize;
    let (Some(strings_end), Some(pointers_end)) = (
        strings.checked_add(env.buf.len()),
        pointers.checked_add(env.starts.len() * 4),
    ) else {
        return FAULT;
    };
    if strings_end > data.len() || pointers_end > data.len() {
        return FAULT;
    }
    data[strings..strings_end].copy_from_slice(&env.buf);
    for (slot, start) in data[pointers..pointers_end]
        .chunks_exact_mut(4)
        .zip(&env.starts)
    {
        // In bounds of a 32-bit memory: `buf + start` is below `strings_end`.
        let at = buf.wrapping_add(*start);
        slot.copy_from_slice(&at.to_le_bytes());
    }
    SUCCESS
}

/// Writes `bytes` at `ptr` in the guest's memory; false when that is out of bounds.
fn write(caller: &mut Caller<'_, Host>, ptr: u32, bytes: &[u8]) -> bool {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return false;
    };
    mem.write(caller, ptr as usize, bytes).is_ok()
}
