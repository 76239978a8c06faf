//! alloc: a WAGI handler that takes as much memory as the request asks for.
//!
//! `GET /alloc?N` allocates N MiB, writes to every page of it, and answers `allocated N MiB`.
//! Tests use it to show `resources.limits.memory` at work: a request for more than the
//! container's limit fails alone (500, the reason in the container log), a smaller one succeeds.

use std::io::Write;

fn main() {
    let mib: usize = std::env::var("QUERY_STRING")
        .ok()
        .and_then(|q| q.parse().ok())
        .unwrap_or(1);
    let mut block: Vec<u8> = Vec::with_capacity(mib << 20);
    for i in 0..(mib << 20) / 4096 {
        block.push((i % 251) as u8);
        block.resize((i + 1) * 4096, 1);
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    write!(out, "Content-Type: text/plain\n\nallocated {} MiB\n", block.len() >> 20).unwrap();
    out.flush().unwrap();
}
