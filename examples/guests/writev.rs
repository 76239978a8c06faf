//! writev: prints as the WAGI-era guests of Grain and AssemblyScript did: the whole CGI response
//! (headers, the blank line, the body) with ONE `fd_write` of several buffers to stdout, and a
//! log line with one `fd_write` of two buffers to stderr, never looking at the count written.
//!
//! Answers `Content-Type: text/plain`, `X-Buffers: 4` and the body `every buffer arrived\n`.
//! Writes `writev: part one, part two` (one line) to stderr.
//! Tests use it to check that a host writes every buffer of an fd_write to the CGI pipes.

#[repr(C)]
struct Ciovec {
    buf: *const u8,
    buf_len: usize,
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    #[link_name = "fd_write"]
    fn wasi_fd_write(fd: u32, iovs: *const Ciovec, iovs_len: usize, nwritten: *mut usize) -> u32;
}

/// One fd_write of all of `parts`; the count is ignored, as those guests ignored it.
fn write_once(fd: u32, parts: &[&[u8]]) {
    let iovs: Vec<Ciovec> = parts
        .iter()
        .map(|p| Ciovec {
            buf: p.as_ptr(),
            buf_len: p.len(),
        })
        .collect();
    let mut written = 0usize;
    unsafe {
        wasi_fd_write(fd, iovs.as_ptr(), iovs.len(), &mut written);
    }
}

fn main() {
    write_once(
        1,
        &[
            b"Content-Type: text/plain\n",
            b"X-Buffers: 4\n",
            b"\n",
            b"every buffer arrived\n",
        ],
    );
    write_once(2, &[b"writev: part one, ", b"part two\n"]);
}
