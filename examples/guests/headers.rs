//! headers: repeated CGI headers, and a redirect.
//!
//! Normally answers with
//!   Content-Type: text/plain
//!   Set-Cookie: a=1
//!   Set-Cookie: b=2
//!   X-Custom: yes
//! and the body `ok\n`. When the query string is exactly `redirect`, it answers only
//! `Location: /hello` and an empty body (the runtime turns a Location-only answer into a 302).
//! Tests use it to check that repeated headers are all kept and the CGI redirect rule.

use std::io::Write;

fn main() {
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let response: &[u8] = if query == "redirect" {
        b"Location: /hello\n\n"
    } else {
        b"Content-Type: text/plain\n\
          Set-Cookie: a=1\n\
          Set-Cookie: b=2\n\
          X-Custom: yes\n\
          \n\
          ok\n"
    };

    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(response).unwrap();
    out.flush().unwrap();
}
