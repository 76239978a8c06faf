//! hello: the smallest WAGI handler.
//!
//! Always answers `Content-Type: text/plain` with the body `hello world\n`, whatever the
//! request. The seed's `curl /hello` prints exactly `hello world`; tests use it as the
//! "does a route work at all" module and as the redirect target of `headers`.

use std::io::Write;

fn main() {
    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(b"Content-Type: text/plain\n\nhello world\n").unwrap();
    out.flush().unwrap();
}
