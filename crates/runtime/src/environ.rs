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

/// A guest's environment, as `environ_get` hands it over: what an [`Invocation`] runs with.
/// A pod's variables are laid out once, when it starts, and each WAGI request copies that
/// buffer and appends its CGI variables to it ([`Environ::push`]), with no string per variable.
/// Components take it as name/value pairs ([`Environ::iter`]).
///
/// [`Invocation`]: crate::Invocation
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Environ {
    /// `NAME=value\0` for every variable, in order.
    buf: String,
    /// Where each variable starts in `buf`, and where its `=` is.
    vars: Vec<(u32, u32)>,
}

impl Environ {
    /// The environment of `vars`, in order.
    pub fn new(vars: &[(String, String)]) -> Environ {
        let len = vars.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut env = Environ::with_capacity(vars.len(), len);
        for (k, v) in vars {
            env.push(k, v);
        }
        env
    }

    /// An empty environment with room for `vars` variables of `bytes` in all.
    pub fn with_capacity(vars: usize, bytes: usize) -> Environ {
        Environ {
            buf: String::with_capacity(bytes),
            vars: Vec::with_capacity(vars),
        }
    }

    /// A copy of this environment, with room for `vars` more variables of `bytes` more.
    pub fn clone_with_room(&self, vars: usize, bytes: usize) -> Environ {
        let mut env = Environ::with_capacity(self.vars.len() + vars, self.buf.len() + bytes);
        env.buf.push_str(&self.buf);
        env.vars.extend_from_slice(&self.vars);
        env
    }

    /// Appends `name=value`. A name should hold no `=` and neither a NUL: a guest's libc
    /// splits at the first `=` and ends at the NUL, and so does [`Environ::iter`].
    pub fn push(&mut self, name: &str, value: &str) {
        // A variable past 4 GiB cannot reach a 32-bit guest; `sizes` reports the overflow.
        let at = |len: usize| u32::try_from(len).unwrap_or(u32::MAX);
        let start = at(self.buf.len());
        self.buf.push_str(name);
        let eq = at(self.buf.len());
        self.buf.push('=');
        self.buf.push_str(value);
        self.buf.push('\0');
        self.vars.push((start, eq));
    }

    /// How many variables there are.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Every variable as `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let ends = self.vars.iter().skip(1).map(|(s, _)| *s as usize);
        let ends = ends.chain(std::iter::once(self.buf.len()));
        self.vars.iter().zip(ends).map(|(&(start, eq), end)| {
            let (start, eq) = (start as usize, eq as usize);
            // Each piece lies between ASCII bytes ('=' and the NUL), so on char boundaries.
            let name = self.buf.get(start..eq).unwrap_or_default();
            let value = self.buf.get(eq + 1..end - 1).unwrap_or_default();
            (name, value)
        })
    }

    /// `(count, bytes)` as `environ_sizes_get` reports them, if they fit in 32 bits.
    fn sizes(&self) -> Option<(u32, u32)> {
        Some((
            u32::try_from(self.vars.len()).ok()?,
            u32::try_from(self.buf.len()).ok()?,
        ))
    }
}

impl From<Vec<(String, String)>> for Environ {
    fn from(vars: Vec<(String, String)>) -> Environ {
        Environ::new(&vars)
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Environ {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(vars: I) -> Environ {
        let mut env = Environ::default();
        for (k, v) in vars {
            env.push(k, v);
        }
        env
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
        pointers.checked_add(env.vars.len() * 4),
    ) else {
        return FAULT;
    };
    if strings_end > data.len() || pointers_end > data.len() {
        return FAULT;
    }
    data[strings..strings_end].copy_from_slice(env.buf.as_bytes());
    for (slot, (start, _)) in data[pointers..pointers_end]
        .chunks_exact_mut(4)
        .zip(&env.vars)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_come_back_as_pushed_and_a_copy_with_room_keeps_them() {
        let base = Environ::new(&[("A".into(), "1".into()), ("B".into(), "x=y".into())]);
        let mut env = base.clone_with_room(2, 16);
        env.push("C", "");
        env.push("D", "é");
        let got: Vec<_> = env.iter().collect();
        assert_eq!(got, [("A", "1"), ("B", "x=y"), ("C", ""), ("D", "é")]);
        assert_eq!(env.buf, "A=1\0B=x=y\0C=\0D=é\0");
        assert_eq!(env.sizes(), Some((4, env.buf.len() as u32)));
        assert_eq!(base.iter().count(), 2);
        assert!(Environ::default().iter().next().is_none());
    }
}
