//! health: a WAGI handler whose health the operator (or a test) switches with files.
//!
//! For a request to `/.../<name>` it looks for the file `/state/<name>.fail` (the pod mounts a
//! volume at `/state`): while that file exists it answers `500` with `failing: <name>`, else
//! `200` with `ok: <name>`. `/.../<name>` where `/state/<name>.redirect` exists answers `302`
//! to the path written in that file. Anything else in the path is ignored, so one module can
//! serve a liveness path and a readiness path that fail separately.

use std::io::Write;

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    let script = std::env::var("SCRIPT_NAME").unwrap_or_default();
    let full = format!("{script}{path}");
    let name = full
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("root")
        .to_string();
    let out = std::io::stdout();
    let mut out = out.lock();
    let fail = format!("/state/{name}.fail");
    let redirect = format!("/state/{name}.redirect");
    let response = if std::path::Path::new(&fail).exists() {
        format!("Status: 500\nContent-Type: text/plain\n\nfailing: {name}\n")
    } else if let Ok(to) = std::fs::read_to_string(&redirect) {
        format!(
            "Status: 302\nLocation: {}\nContent-Type: text/plain\n\nmoved: {name}\n",
            to.trim()
        )
    } else {
        format!("Content-Type: text/plain\n\nok: {name}\n")
    };
    out.write_all(response.as_bytes()).unwrap();
    out.flush().unwrap();
}
