//! index: a small HTML page listing the demo routes.
//!
//! Answers `Content-Type: text/html` with links to /hello, /log, /error and /http-example.
//! Tests check the content type and that each route's path appears in the body.

use std::io::Write;

const ROUTES: &[(&str, &str)] = &[
    ("/hello", "says hello world"),
    ("/log", "writes three lines to the module log (stderr)"),
    ("/error", "answers 500 Internal Server Error"),
    ("/http-example", "makes an outbound HTTP request (?url=...)"),
];

fn main() {
    let mut body = String::new();
    body.push_str("<!DOCTYPE html>\n<html>\n<head><title>wasinode demo</title></head>\n<body>\n");
    body.push_str("<h1>wasinode demo routes</h1>\n<ul>\n");
    for (path, what) in ROUTES {
        body.push_str(&format!("<li><a href=\"{path}\">{path}</a>: {what}</li>\n"));
    }
    body.push_str("</ul>\n</body>\n</html>\n");

    let out = std::io::stdout();
    let mut out = out.lock();
    out.write_all(b"Content-Type: text/html\n\n").unwrap();
    out.write_all(body.as_bytes()).unwrap();
    out.flush().unwrap();
}
