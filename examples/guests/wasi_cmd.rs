//! wasi_cmd: a plain WASI command (no HTTP, no CGI), for `wasinode run` and job-style workloads.
//!
//! In this order:
//!   1. stdout `args=<arguments after argv[0], joined by one space>` (the line is `args=` when
//!      there are none);
//!   2. stdout one `NAME=value` line per environment variable whose name starts with `APP_`,
//!      sorted by name;
//!   3. if env `READ_FILE` is set: stdout the contents of that file as is (a path in a
//!      preopened dir, e.g. `/data/x.txt`); if it cannot be read, stderr
//!      `cannot read <path>: <error>` and exit code 2;
//!   4. if env `WRITE_FILE` is set (paths separated by `,`): tries to write `overwritten` to
//!      each, and prints stdout `write <path>: ok` or `write <path>: denied (<error>)`;
//!   5. stderr `stderr line`;
//!   6. if env `SLEEP_MS` is set: sleeps that many milliseconds;
//!   7. exits with the code in env `EXIT_CODE` (default 0; a value that is not an integer
//!      gives stderr `bad EXIT_CODE` and exit code 2).
//! Tests use it for args, env, preopened dirs, stdout/stderr capture, timeouts and exit codes.

use std::io::Write;
use std::time::Duration;

fn main() {
    let out = std::io::stdout();
    let mut out = out.lock();

    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    writeln!(out, "args={}", args.join(" ")).unwrap();

    let mut app_vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .filter(|(k, _)| k.starts_with("APP_"))
        .collect();
    app_vars.sort();
    for (k, v) in &app_vars {
        writeln!(out, "{k}={v}").unwrap();
    }

    if let Some(path) = std::env::var_os("READ_FILE") {
        match std::fs::read(&path) {
            Ok(contents) => out.write_all(&contents).unwrap(),
            Err(e) => {
                out.flush().unwrap();
                eprintln!("cannot read {}: {e}", path.to_string_lossy());
                std::process::exit(2);
            }
        }
    }
    if let Ok(paths) = std::env::var("WRITE_FILE") {
        for path in paths.split(',').filter(|p| !p.is_empty()) {
            match std::fs::write(path, "overwritten") {
                Ok(()) => writeln!(out, "write {path}: ok").unwrap(),
                Err(e) => writeln!(out, "write {path}: denied ({e})").unwrap(),
            }
        }
    }
    // std::process::exit does not flush stdout's buffer: do it now.
    out.flush().unwrap();

    eprintln!("stderr line");

    if let Ok(ms) = std::env::var("SLEEP_MS") {
        match ms.trim().parse::<u64>() {
            Ok(ms) => std::thread::sleep(Duration::from_millis(ms)),
            Err(_) => eprintln!("bad SLEEP_MS {ms:?}: not sleeping"),
        }
    }

    let code = match std::env::var("EXIT_CODE") {
        Ok(c) => match c.trim().parse::<i32>() {
            Ok(c) => c,
            Err(_) => {
                eprintln!("bad EXIT_CODE {c:?}");
                2
            }
        },
        Err(_) => 0,
    };
    std::process::exit(code);
}
