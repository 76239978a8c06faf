//! An `fd_write` that takes every buffer of the call.
//!
//! wasmtime-wasi's preview-1 `fd_write` writes only the first non-empty iovec of a call and
//! returns a short count (`first_non_empty_ciovec` in its `p1.rs`). POSIX allows that, but guests
//! of the WAGI era (Grain's and AssemblyScript's printing) write a CGI head and body with one
//! `fd_write` of several iovecs and never look at the count, so all but the first buffer was lost:
//! the blank line that ends the CGI headers never arrived and the response was a 502. WAGI's
//! wasi-common wrote them all.
//!
//! This shadows `wasi_snapshot_preview1::fd_write` in the Linker. A call with at most one
//! non-empty iovec goes to wasmtime-wasi's implementation as it is. A call with several becomes
//! one call of that implementation per non-empty iovec, in order, each given a one-element slice
//! of the guest's own iovec array (so no guest memory is needed for it), until one writes less
//! than its buffer or fails. The guest is told the total, as `writev` does. Every descriptor
//! (stdout, stderr, files, preopens) keeps wasmtime-wasi's semantics for each buffer.

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as p1, WasiSnapshotPreview1};

use crate::run::Host;

const MODULE: &str = "wasi_snapshot_preview1";
/// Size of a `ciovec` in guest memory: `buf: u32, buf_len: u32`.
const CIOVEC: u32 = 8;
/// `errno::success`.
const SUCCESS: i32 = 0;

pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let defined = linker
        .func_wrap_async(
            MODULE,
            "fd_write",
            |mut caller: Caller<'_, Host>, (fd, iovs, iovs_len, nwritten): (i32, i32, i32, i32)| {
                Box::new(
                    async move { fd_write_all(&mut caller, fd, iovs, iovs_len, nwritten).await },
                )
            },
        )
        .map(|_| ());
    linker.allow_shadowing(false);
    defined
}

async fn fd_write_all(
    caller: &mut Caller<'_, Host>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    let Some(buffers) = non_empty_iovecs(caller, iovs as u32, iovs_len as u32) else {
        return original(caller, fd, iovs, iovs_len, nwritten).await;
    };
    let mut total: u32 = 0;
    for (index, len) in buffers {
        let one = iovs as u32 + index * CIOVEC;
        let errno = original(caller, fd, one as i32, 1, nwritten).await?;
        if errno != SUCCESS {
            if total == 0 {
                return Ok(errno);
            }
            // What was written stays written; the error comes back on the next call.
            break;
        }
        let n = read_u32(caller, nwritten as u32).unwrap_or(0);
        total = match total.checked_add(n) {
            Some(t) => t,
            None => break,
        };
        if n < len {
            break;
        }
    }
    // The original wrote the count at this address just now, so it is in bounds.
    write_u32(caller, nwritten as u32, total);
    Ok(SUCCESS)
}

/// `(index, buf_len)` of every non-empty iovec, when there are at least two; `None` otherwise
/// (and when the array is out of bounds, which the original reports as the guest's fault).
fn non_empty_iovecs(caller: &mut Caller<'_, Host>, iovs: u32, len: u32) -> Option<Vec<(u32, u32)>> {
    if len < 2 {
        return None;
    }
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return None;
    };
    let data = mem.data(&caller);
    let start = iovs as usize;
    let end = start.checked_add((len as usize).checked_mul(CIOVEC as usize)?)?;
    let array = data.get(start..end)?;
    let found: Vec<(u32, u32)> = array
        .chunks_exact(CIOVEC as usize)
        .enumerate()
        .filter_map(|(i, iov)| {
            let buf_len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
            (buf_len > 0).then_some((i as u32, buf_len))
        })
        .collect();
    (found.len() > 1).then_some(found)
}

/// wasmtime-wasi's own `fd_write`, called as its Linker entry calls it.
async fn original(
    caller: &mut Caller<'_, Host>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    let fuel = caller.as_context_mut().hostcall_fuel();
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            let (mem, host) = m.data_and_store_mut(&mut *caller);
            host.wasi.set_hostcall_fuel(fuel);
            let mut mem = wiggle::GuestMemory::Unshared(mem);
            p1::fd_write(&mut host.wasi, &mut mem, fd, iovs, iovs_len, nwritten).await
        }
        Some(Extern::SharedMemory(m)) => {
            let host = caller.data_mut();
            host.wasi.set_hostcall_fuel(fuel);
            let mut mem = wiggle::GuestMemory::Shared(m.data());
            p1::fd_write(&mut host.wasi, &mut mem, fd, iovs, iovs_len, nwritten).await
        }
        _ => wasmtime::bail!("missing required memory export"),
    }
}

fn read_u32(caller: &mut Caller<'_, Host>, ptr: u32) -> Option<u32> {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return None;
    };
    let mut b = [0u8; 4];
    mem.read(&caller, ptr as usize, &mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: u32, v: u32) {
    if let Some(Extern::Memory(mem)) = caller.get_export("memory") {
        let _ = mem.write(caller, ptr as usize, &v.to_le_bytes());
    }
}
