//! error: the demo error route.
//!
//! Writes `error route called: answering 500` to stderr and answers
//! `Status: 500 Internal Server Error` with a `text/plain` body explaining that this is the
//! demo error route. The module itself exits normally: tests use it to check that a CGI
//! `Status:` header sets the HTTP status (as opposed to a trap, see examples/wat/trap.wat).

use std::io::Write;

fn main() {
    eprintln!("error route called: answering 500");

    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(
        b"Status: 500 Internal Server Error\n\
          Content-Type: text/plain\n\
          \n\
          this is the demo error route: it always answers 500 Internal Server Error\n",
    )
    .unwrap();
    out.flush().unwrap();
}
