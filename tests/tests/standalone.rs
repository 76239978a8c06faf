//! `wasinode run` end to end: the real binary, guest modules built from examples/, real HTTP.
//! Each test asserts what a user observes: status codes, bodies, headers, exit codes, log lines.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use e2e::guests::{guest, wat};
use e2e::wasinode::{Wasinode, find_log, free_port, get, http, listening, run_one, write_file};

const T: Duration = Duration::from_secs(30);

/// A WAGI pod manifest: `modules` is the annotation JSON, `containers` (name, image) pairs.
fn wagi_pod(
    name: &str,
    addr: &str,
    modules: &str,
    containers: &[(&str, &Path)],
    extra_container_yaml: &str,
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{addr}\"\n    alpha.wagi.krustlet.dev/modules: '{modules}'\nspec:\n  containers:\n"
    );
    for (c, image) in containers {
        y.push_str(&format!(
            "    - name: {c}\n      image: file://{}\n{extra_container_yaml}",
            image.display()
        ));
    }
    y
}

fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn seed_demo_serves_routes_and_stops_cleanly_on_sigint() -> Result<()> {
    e2e::guests::guests()?;
    // The README's example manifest, as is, but on a free port (the seed's 3001 may be taken).
    let port = free_port();
    let text = std::fs::read_to_string(e2e::guests::repo_root().join("examples/wagi-demo.yaml"))?
        .replace("0.0.0.0:3001", &format!("127.0.0.1:{port}"));
    let dir = e2e::guests::repo_root().join("examples");
    let manifest = dir.join(format!(".test-demo-{port}.yaml"));
    std::fs::write(&manifest, text)?;
    let mut w = Wasinode::start(&["run", manifest.to_str().unwrap_or_default()])?;
    let a = format!("127.0.0.1:{port}");
    let ready = w.wait_listening(&a, T);
    let _ = std::fs::remove_file(&manifest);
    ready?;
    let r = get(&a, "/hello")?;
    assert_eq!((r.status, r.body.as_str()), (200, "hello world\n"));
    assert_eq!(
        get(&a, "/hello/a/b")?.body,
        "hello world\n",
        "prefix route serves sub-paths"
    );
    assert_eq!(
        get(&a, "/helloworld")?.status,
        404,
        "/hello/... stops at a segment boundary and \"/\" is exact, so nothing matches"
    );
    let idx = get(&a, "/")?;
    assert_eq!(idx.status, 200);
    assert!(idx.body.contains("/hello"), "{}", idx.body);
    assert_eq!(get(&a, "/error")?.status, 500);
    assert_eq!(get(&a, "/log")?.body, "logged 3 lines\n");
    w.signal("INT")?;
    let st = w.wait_exit(T)?;
    assert_eq!(st.code(), Some(0), "{}", w.output());
    assert!(!listening(&a), "port still open after exit");
    let out = w.output();
    assert!(
        out.contains("[default/krustlet-wagi-demo/krustlet-wagi-demo-log] log line 1"),
        "{out}"
    );
    Ok(())
}

#[test]
fn cgi_environment_argv_body_and_container_env() -> Result<()> {
    let a = addr();
    let y = wagi_pod(
        "echo",
        &a,
        r#"{"echo": {"route": "/echo/..."}}"#,
        &[("echo", &guest("cgi_echo")?)],
        "      env: [{name: GREETING, value: \"hi there\"}]\n",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    let r = http(
        "POST",
        &a,
        "/echo/sub%20dir/x?b=2&a=hello%20world",
        &[
            ("Content-Type", "application/json"),
            ("X-Trace", "t1"),
            ("X-Trace", "t2"),
        ],
        b"{\"k\":1}",
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let env: std::collections::HashMap<&str, &str> =
        r.body.lines().filter_map(|l| l.split_once('=')).collect();
    let port = a.rsplit(':').next().unwrap_or_default();
    for (k, v) in [
        ("REQUEST_METHOD", "POST"),
        ("SCRIPT_NAME", "/echo"),
        ("PATH_INFO", "/sub dir/x"),
        ("X_RAW_PATH_INFO", "/sub%20dir/x"),
        ("PATH_TRANSLATED", "/sub dir/x"),
        ("X_MATCHED_ROUTE", "/echo/..."),
        ("QUERY_STRING", "b=2&a=hello%20world"),
        ("CONTENT_TYPE", "application/json"),
        ("CONTENT_LENGTH", "7"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_NAME", "127.0.0.1"),
        ("SERVER_PORT", port),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_HOST", "127.0.0.1"),
        ("AUTH_TYPE", ""),
        ("REMOTE_USER", ""),
        ("HTTP_X_TRACE", "t1, t2"),
        ("GREETING", "hi there"),
    ] {
        assert_eq!(env.get(k).copied(), Some(v), "{k} in:\n{}", r.body);
    }
    assert!(
        env.get("SERVER_SOFTWARE")
            .is_some_and(|s| s.starts_with("wasinode/"))
    );
    assert_eq!(
        env.get("X_FULL_URL").copied(),
        Some(format!("http://{a}/echo/sub%20dir/x?b=2&a=hello%20world").as_str())
    );
    assert!(
        r.body
            .contains("argv[0]=/echo/sub%20dir/x\nargv[1]=b=2\nargv[2]=a=hello%20world\n"),
        "{}",
        r.body
    );
    assert!(r.body.ends_with("stdin={\"k\":1}"), "{}", r.body);
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn response_headers_redirects_bad_output_and_route_precedence() -> Result<()> {
    let a = addr();
    let modules = r#"{"headers": {"route": "/h/b"}, "hello": {"route": "/h/..."}, "bad": {"route": "/bad"}, "routes": {"route": "/r/..."}}"#;
    let y = wagi_pod(
        "resp",
        &a,
        modules,
        &[
            ("headers", &guest("headers")?),
            ("hello", &guest("hello")?),
            ("bad", &wat("bad_header")),
            ("routes", &wat("routes")),
        ],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    // Exact beats prefix; the prefix serves its own path and below, not siblings.
    let r = get(&a, "/h/b")?;
    assert_eq!(r.body, "ok\n");
    assert_eq!(
        r.headers_named("set-cookie"),
        vec!["a=1", "b=2"],
        "repeated headers kept in order"
    );
    assert_eq!(r.header("x-custom"), Some("yes"));
    assert_eq!(get(&a, "/h/bc")?.body, "hello world\n");
    assert_eq!(get(&a, "/h")?.body, "hello world\n");
    assert_eq!(get(&a, "/hx")?.status, 404);
    let redirect = get(&a, "/h/b?redirect")?;
    assert_eq!(
        (redirect.status, redirect.header("location")),
        (302, Some("/hello"))
    );
    // Output with no CGI header block: 502, and the reason in the container's log.
    assert_eq!(get(&a, "/bad")?.status, 502);
    // _routes: the module's own sub-routes with their entrypoints.
    assert_eq!(get(&a, "/r")?.body, "root\n");
    assert_eq!(get(&a, "/r/one")?.body, "one\n");
    assert_eq!(get(&a, "/r/two/deeper")?.body, "two\n");
    assert_eq!(
        get(&a, "/r/three")?.body,
        "root\n",
        "unmatched sub-paths fall back to the module's prefix route"
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    let log = find_log(&w.data_dir, "bad")?;
    assert!(
        log.contains("bad CGI response") && log.contains("header block"),
        "{log}"
    );
    Ok(())
}

#[test]
fn a_trap_a_hang_and_a_memory_hog_fail_only_their_own_request() -> Result<()> {
    let a = addr();
    let modules = r#"{"loop": {"route": "/loop"}, "grow": {"route": "/grow"}, "trap": {"route": "/trap"}, "hello": {"route": "/hello"}}"#;
    let y = wagi_pod(
        "bad-guests",
        &a,
        modules,
        &[
            ("loop", &wat("loop")),
            ("grow", &wat("grow")),
            ("trap", &wat("trap")),
            ("hello", &guest("hello")?),
        ],
        "",
    );
    let (mut w, _d) = run_one(
        &y,
        &[
            "--quiet",
            "--request-timeout",
            "1s",
            "--max-memory",
            "32MiB",
        ],
    )?;
    w.wait_listening(&a, T)?;
    let before = w.rss_kib()?;
    let hang = {
        let a = a.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            (get(&a, "/loop").map(|r| r.status).unwrap_or(0), t.elapsed())
        })
    };
    // While one request spins, others are served.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(&a, "/hello")?.body, "hello world\n");
    let (status, took) = hang
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?;
    assert_eq!(status, 504);
    assert!(
        took < Duration::from_secs(10),
        "cut at the request timeout, took {took:?}"
    );
    for _ in 0..10 {
        assert_eq!(get(&a, "/grow")?.status, 500);
        assert_eq!(get(&a, "/trap")?.status, 500);
    }
    assert_eq!(get(&a, "/hello")?.body, "hello world\n");
    let after = w.rss_kib()?;
    assert!(
        after < before + 64 * 1024,
        "resident memory grew from {before} KiB to {after} KiB after 10 memory hogs of 32 MiB"
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    let log = find_log(&w.data_dir, "grow")?;
    assert!(log.contains("more than 33554432 bytes of memory"), "{log}");
    let log = find_log(&w.data_dir, "loop")?;
    assert!(log.contains("did not finish within"), "{log}");
    Ok(())
}

/// A loopback HTTP server answering every request with `body` after `delay`; counts requests.
fn upstream(
    body: &'static str,
    delay: Duration,
) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = l.local_addr()?.to_string();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(50) {
            let Ok(mut s) = s else { continue };
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            std::thread::sleep(delay);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok((a, hits))
}

#[test]
fn outbound_http_only_to_allowed_hosts() -> Result<()> {
    let (up, hits) = upstream("upstream ok", Duration::ZERO)?;
    let a = addr();
    let modules = format!(
        r#"{{"allowed": {{"route": "/allowed", "allowed_hosts": ["http://{up}"]}}, "denied": {{"route": "/denied"}}}}"#
    );
    let y = wagi_pod(
        "outbound",
        &a,
        &modules,
        &[
            ("allowed", &guest("http_example")?),
            ("denied", &guest("http_example")?),
        ],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    let ok = get(&a, &format!("/allowed?url=http://{up}/x"))?;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(
        ok.body.contains("status: 200") && ok.body.contains("upstream ok"),
        "{}",
        ok.body
    );
    let n = hits.load(std::sync::atomic::Ordering::SeqCst);
    let denied = get(&a, &format!("/denied?url=http://{up}/x"))?;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.contains("error 7"), "{}", denied.body);
    // Same host, other port: not the allowed origin.
    let port: u16 = up
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    let other = get(
        &a,
        &format!("/allowed?url=http://127.0.0.1:{}/x", port.wrapping_add(1)),
    )?;
    assert_eq!(other.status, 403, "{}", other.body);
    // And "localhost" is not "127.0.0.1".
    assert_eq!(
        get(&a, &format!("/allowed?url=http://localhost:{port}/x"))?.status,
        403
    );
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        n,
        "denied requests must not reach the upstream"
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn sigint_lets_an_in_flight_request_finish() -> Result<()> {
    let (up, _hits) = upstream("slow answer", Duration::from_millis(1500))?;
    let a = addr();
    let modules = format!(r#"{{"slow": {{"route": "/slow", "allowed_hosts": ["http://{up}"]}}}}"#);
    let y = wagi_pod(
        "graceful",
        &a,
        &modules,
        &[("slow", &guest("http_example")?)],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    let req = {
        let a = a.clone();
        let up = up.clone();
        std::thread::spawn(move || get(&a, &format!("/slow?url=http://{up}/")))
    };
    std::thread::sleep(Duration::from_millis(400));
    w.signal("INT")?;
    let r = req
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))??;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("slow answer"), "{}", r.body);
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    assert!(!listening(&a));
    Ok(())
}

#[test]
fn module_stderr_reaches_terminal_and_log_file() -> Result<()> {
    let a = addr();
    let y = wagi_pod(
        "logger",
        &a,
        r#"{"log": {"route": "/log"}}"#,
        &[("log", &guest("log")?)],
        "",
    );
    let (mut w, _d) = run_one(&y, &[])?;
    w.wait_listening(&a, T)?;
    get(&a, "/log?x=1")?;
    w.wait_output("[default/logger/log] log line 3: path= query=x=1", T)?;
    w.signal("INT")?;
    w.wait_exit(T)?;
    let log = find_log(&w.data_dir, "log")?;
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(
        lines[0].ends_with(" stderr F log line 1"),
        "CRI format: {}",
        lines[0]
    );
    Ok(())
}

#[test]
fn broken_pods_are_reported_and_the_others_keep_serving() -> Result<()> {
    let a = addr();
    let good = wagi_pod(
        "good",
        &a,
        r#"{"hello": {"route": "/hello"}}"#,
        &[("hello", &guest("hello")?)],
        "",
    );
    let broken_json = wagi_pod(
        "broken-json",
        &addr(),
        r#"{"hello": {"route": "/hello"}"#,
        &[("hello", &guest("hello")?)],
        "",
    );
    let same_port = wagi_pod(
        "same-port",
        &a,
        r#"{"hello": {"route": "/hello"}}"#,
        &[("hello", &guest("hello")?)],
        "",
    );
    let not_wasm = wagi_pod(
        "not-wasm",
        &addr(),
        r#"{"x": {"route": "/x"}}"#,
        &[("x", Path::new("/etc/hostname"))],
        "",
    );
    let missing = wagi_pod(
        "missing-file",
        &addr(),
        r#"{"x": {"route": "/x"}}"#,
        &[("x", Path::new("/nonexistent/x.wasm"))],
        "",
    );
    // The good pod first so it owns the port; the others are in a second file.
    let dir = tempfile::tempdir()?;
    let m1 = write_file(dir.path(), "good.yaml", &good)?;
    let m2 = write_file(
        dir.path(),
        "bad.yaml",
        &[broken_json, same_port, not_wasm, missing].join("---\n"),
    )?;
    let mut w = Wasinode::start(&["run", "--quiet", m1.to_str().unwrap_or_default()])?;
    w.wait_listening(&a, T)?;
    let mut w2 = Wasinode::start(&["run", "--quiet", m2.to_str().unwrap_or_default()])?;
    let st = w2.wait_exit(T)?;
    let out = w2.output();
    assert_ne!(
        st.code(),
        Some(0),
        "no pod could start: must exit non-zero\n{out}"
    );
    assert!(
        out.contains("pod default/broken-json")
            && out.contains("alpha.wagi.krustlet.dev/modules")
            && out.contains("JSON"),
        "{out}"
    );
    assert!(out.contains("PortInUse") && out.contains(&a), "{out}");
    assert!(
        out.contains("not-wasm") && out.contains("not valid WebAssembly"),
        "{out}"
    );
    assert!(out.contains("/nonexistent/x.wasm"), "{out}");
    assert_eq!(
        get(&a, "/hello")?.body,
        "hello world\n",
        "the first process is unaffected"
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

fn wasi_pod(name: &str, restart: &str, env: &str, extra_spec: &str) -> Result<String> {
    Ok(format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {restart}\n  containers:\n    - name: main\n      image: file://{}\n      args: [\"one\", \"two\"]\n      env: [{env}]\n{extra_spec}",
        guest("wasi_cmd")?.display()
    ))
}

#[test]
fn wasi_command_pods_args_env_volumes_exit_codes() -> Result<()> {
    let vol = tempfile::tempdir()?;
    std::fs::write(vol.path().join("x.txt"), "from the volume")?;
    let extra = format!(
        "      volumeMounts: [{{name: data, mountPath: /data, readOnly: true}}]\n  volumes: [{{name: data, hostPath: {{path: {}}}}}]\n",
        vol.path().display()
    );
    let y = wasi_pod(
        "job",
        "Never",
        "{name: APP_COLOR, value: blue}, {name: READ_FILE, value: /data/x.txt}, {name: EXIT_CODE, value: \"3\"}",
        &extra,
    )?;
    let (mut w, _d) = run_one(&y, &[])?;
    let st = w.wait_exit(T)?;
    let out = w.output();
    assert_eq!(
        st.code(),
        Some(1),
        "a failed command pod makes run exit non-zero\n{out}"
    );
    assert!(out.contains("[default/job/main] args=one two"), "{out}");
    assert!(out.contains("[default/job/main] APP_COLOR=blue"), "{out}");
    assert!(out.contains("[default/job/main] from the volume"), "{out}");
    assert!(out.contains("exit code 3 (Error)"), "{out}");
    assert!(out.contains("default/job: Failed"), "{out}");

    let ok = wasi_pod("ok-job", "Never", "{name: EXIT_CODE, value: \"0\"}", "")?;
    let (mut w, _d) = run_one(&ok, &["--quiet"])?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0), "{}", w.output());
    assert!(w.output().contains("default/ok-job: Succeeded"));
    Ok(())
}

#[test]
fn restart_policy_restarts_failed_commands_with_backoff() -> Result<()> {
    let y = wasi_pod("crashy", "OnFailure", "{name: EXIT_CODE, value: \"1\"}", "")?;
    let (mut w, _d) = run_one(&y, &["--quiet", "--restart-backoff", "100ms"])?;
    w.wait_output("restarts 2", T)?;
    let out = w.wait_output("CrashLoopBackOff", T)?;
    assert!(out.contains("BackOff"), "{out}");
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    // The previous run's log is kept beside the current one.
    let dir = std::fs::read_dir(w.data_dir.join("logs"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no log dir"))??
        .path();
    assert!(dir.join("main.log.previous").exists());
    Ok(())
}

#[test]
fn help_explains_itself() -> Result<()> {
    let out = std::process::Command::new(e2e::wasinode::binary())
        .args(["run", "--help"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--request-timeout",
        "--max-memory",
        "--data-dir",
        "MANIFEST",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    Ok(())
}

/// The header blocks an upstream received, one per request, in order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

/// A loopback HTTP server that answers every request with `body` and keeps the header block of
/// each request it received (`name: value` lines, names lowercased), in order.
fn recording_upstream(body: Vec<u8>) -> Result<(String, Seen)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = l.local_addr()?.to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let headers = text
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            if let Ok(mut v) = s2.lock() {
                v.push(headers);
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    Ok((a, seen))
}

#[test]
fn outbound_requests_carry_no_guest_host_or_hop_by_hop_headers() -> Result<()> {
    let (up, seen) = recording_upstream(b"fine".to_vec())?;
    let a = addr();
    let modules = format!(r#"{{"out": {{"route": "/out", "allowed_hosts": ["http://{up}"]}}}}"#);
    let y = wagi_pod(
        "hdrs",
        &a,
        &modules,
        &[("out", &guest("http_example")?)],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    // The guest asks for a virtual host behind the allowed origin, and for hop-by-hop headers.
    let q = [
        "h=Host:internal.admin.example",
        "h=Connection:X-Hop",
        "h=X-Hop:1",
        "h=Keep-Alive:timeout=99",
        "h=Proxy-Authorization:Basic%20eDp5",
        "h=Upgrade:websocket",
        "h=TE:trailers",
        "h=X-Keep:kept",
    ]
    .join("&");
    let r = get(&a, &format!("/out?url=http://{up}/x&{q}"))?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("fine"), "{}", r.body);
    let got = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .last()
        .cloned()
        .unwrap_or_default();
    let named = |n: &str| -> Vec<&str> {
        got.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(named("host"), vec![up.as_str()], "{got:?}");
    for n in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
        "te",
    ] {
        assert!(named(n).is_empty(), "{n} was passed through: {got:?}");
    }
    assert!(
        !named("connection").iter().any(|v| v.contains("X-Hop")),
        "{got:?}"
    );
    assert_eq!(named("x-keep"), vec!["kept"], "{got:?}");
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn outbound_link_local_and_metadata_addresses_are_refused_under_allow_all() -> Result<()> {
    let (up, seen) = recording_upstream(b"loopback ok".to_vec())?;
    let a = addr();
    let modules = r#"{"any": {"route": "/any", "allowed_hosts": ["insecure:allow-all"]}}"#;
    let y = wagi_pod("meta", &a, modules, &[("any", &guest("http_example")?)], "");
    let (mut w, _d) = run_one(&y, &["--quiet", "--request-timeout", "5s"])?;
    w.wait_listening(&a, T)?;
    for target in [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.169.254:8080/",
        "http://0xa9fea9fe/",
        "http://%5Bfe80::1%5D/",
        "http://%5B::ffff:169.254.169.254%5D/",
        "http://%5Bfd00:ec2::254%5D/",
    ] {
        let r = get(&a, &format!("/any?url={target}"))?;
        assert_eq!(r.status, 403, "{target}: {}", r.body);
        assert!(r.body.contains("error 7"), "{target}: {}", r.body);
    }
    // Everything else stays reachable under allow-all.
    let r = get(&a, &format!("/any?url=http://{up}/"))?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("loopback ok"), "{}", r.body);
    assert_eq!(seen.lock().map(|v| v.len()).unwrap_or_default(), 1);
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn outbound_response_bodies_count_against_the_memory_budget() -> Result<()> {
    let (up, _seen) = recording_upstream(vec![b'x'; 4 << 20])?;
    let a = addr();
    let modules = format!(r#"{{"big": {{"route": "/big", "allowed_hosts": ["http://{up}"]}}}}"#);
    let y = wagi_pod(
        "bodies",
        &a,
        &modules,
        &[("big", &guest("http_example")?)],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet", "--max-memory", "32MiB"])?;
    w.wait_listening(&a, T)?;
    // Twelve 4 MiB responses read and closed one after the other: each is given back on close.
    let r = get(&a, &format!("/big?url=http://{up}/&n=12"))?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("request 12: status 200 (4194304 bytes)"),
        "{}",
        r.body
    );
    // Twelve held at once would be 48 MiB beside a 32 MiB budget: the one that does not fit
    // fails (error 12, runtime error) instead of the host keeping it.
    let r = get(&a, &format!("/big?url=http://{up}/&n=12&keep=1"))?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("request 2: status 200 (held)"),
        "{}",
        r.body
    );
    assert!(r.body.contains(": error 12"), "{}", r.body);
    assert!(!r.body.contains("request 8: status"), "{}", r.body);
    // The instance's budget ends with it: the next request has all of it again.
    let r = get(&a, &format!("/big?url=http://{up}/&n=3&keep=1"))?;
    assert!(
        r.body.contains("request 3: status 200 (held)"),
        "{}",
        r.body
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn outbound_timeout_bounds_a_request_to_a_silent_upstream() -> Result<()> {
    // Accepts connections, reads, never answers.
    let l = TcpListener::bind("127.0.0.1:0")?;
    let up = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    let a = addr();
    let modules = format!(r#"{{"slow": {{"route": "/slow", "allowed_hosts": ["http://{up}"]}}}}"#);
    let y = wagi_pod(
        "silent",
        &a,
        &modules,
        &[("slow", &guest("http_example")?)],
        "",
    );
    let (mut w, _d) = run_one(
        &y,
        &[
            "--quiet",
            "--request-timeout",
            "120s",
            "--outbound-timeout",
            "1s",
        ],
    )?;
    w.wait_listening(&a, T)?;
    // The guest is told (error 11) and answers for itself, long before the request's deadline.
    let r = get(&a, &format!("/slow?url=http://{up}/"))?;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("error 11"), "{}", r.body);
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn a_pod_with_hanging_requests_gets_503s_and_other_pods_still_200() -> Result<()> {
    let hog = addr();
    let calm = addr();
    let y = [
        wagi_pod(
            "hog",
            &hog,
            r#"{"loop": {"route": "/loop"}}"#,
            &[("loop", &wat("loop"))],
            "",
        ),
        wagi_pod(
            "calm",
            &calm,
            r#"{"hello": {"route": "/hello"}}"#,
            &[("hello", &guest("hello")?)],
            "",
        ),
    ]
    .join("---\n");
    // Four slots in all, two per pod: a pod that hangs holds half, never all.
    let (mut w, _d) = run_one(
        &y,
        &[
            "--quiet",
            "--max-instances",
            "4",
            "--max-instances-per-pod",
            "2",
            "--request-timeout",
            "60s",
            "--shutdown-grace",
            "1s",
        ],
    )?;
    w.wait_listening(&hog, T)?;
    w.wait_listening(&calm, T)?;
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..6 {
        let (hog, tx) = (hog.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(get(&hog, "/loop").map(|r| r.status).unwrap_or(0));
        });
    }
    // Two of the six hang in the module; the four past the pod's bound are refused at once.
    let mut refused = 0;
    while refused < 4 {
        let status = rx.recv_timeout(T)?;
        assert_eq!(
            status, 503,
            "only the pod's own bound answers before the deadline"
        );
        refused += 1;
    }
    for i in 0..20 {
        let r = get(&calm, "/hello")?;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "hello world\n"),
            "request {i}"
        );
    }
    assert!(
        rx.try_recv().is_err(),
        "the hog's two requests were still hanging while the other pod answered"
    );
    let r = get(&hog, "/loop")?;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("too many requests in flight"), "{}", r.body);
    w.signal("INT")?;
    w.wait_exit(T)?;
    Ok(())
}

#[test]
fn one_fd_write_of_several_buffers_reaches_the_client_whole() -> Result<()> {
    let a = addr();
    let y = wagi_pod(
        "writev",
        &a,
        r#"{"w": {"route": "/w"}}"#,
        &[("w", &guest("writev")?)],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    // Headers, the blank line and the body came in one fd_write of four buffers.
    let r = get(&a, "/w")?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-buffers"), Some("4"));
    assert_eq!(r.body, "every buffer arrived\n");
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    let log = find_log(&w.data_dir, "w")?;
    assert!(
        log.lines()
            .any(|l| l.ends_with(" stderr F writev: part one, part two")),
        "{log}"
    );
    Ok(())
}

#[test]
fn argv_is_the_request_path_then_the_raw_query_as_in_wagi() -> Result<()> {
    let a = addr();
    let modules = r#"{"root": {"route": "/..."}, "app": {"route": "/app/..."}, "tpl": {"route": "/tpl/...", "argv": "${SCRIPT_NAME} --flag ${ARGS}"}}"#;
    let echo = guest("cgi_echo")?;
    let y = wagi_pod(
        "argv",
        &a,
        modules,
        &[("root", &echo), ("app", &echo), ("tpl", &echo)],
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    let args = |path: &str| -> Result<Vec<String>> {
        let r = get(&a, path)?;
        anyhow::ensure!(r.status == 200, "{path}: {} {}", r.status, r.body);
        Ok(r.body
            .lines()
            .filter(|l| l.starts_with("argv["))
            .filter_map(|l| l.split_once('=').map(|(_, v)| v.to_string()))
            .collect())
    };
    // Under a `/...` route argv[0] is the whole request path (its SCRIPT_NAME is empty).
    assert_eq!(
        args("/some/deep%20path?a=1&b=%20x")?,
        vec!["/some/deep%20path", "a=1", "b=%20x"]
    );
    assert_eq!(args("/app/x?a=1&b=%20x")?, vec!["/app/x", "a=1", "b=%20x"]);
    assert_eq!(args("/app")?, vec!["/app"]);
    // A template: ${SCRIPT_NAME} is the request path, ${ARGS} the raw query with '&' as spaces.
    assert_eq!(
        args("/tpl/y?a=1&b=%20x")?,
        vec!["/tpl/y", "--flag", "a=1", "b=%20x"]
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    Ok(())
}

#[test]
fn run_rotates_container_logs_and_still_echoes_every_line() -> Result<()> {
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: filler\nspec:\n  restartPolicy: Never\n  containers:\n    - name: main\n      image: file://{}\n      env: [{{name: LINES, value: \"2000\"}}, {{name: REST_S, value: \"0\"}}]\n",
        guest("log_lines")?.display()
    );
    let (mut w, _d) = run_one(
        &y,
        &[
            "--container-log-max-size",
            "4KiB",
            "--container-log-max-files",
            "2",
        ],
    )?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0), "{}", w.output());
    // The terminal gets every line (written before run exits), the files only the newest.
    let out = w.output();
    let echoed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("[default/filler/main] "))
        .collect();
    let want: Vec<String> = (0..2000)
        .map(|i| format!("line {i:07}"))
        .chain(["done 2000".to_string()])
        .collect();
    assert_eq!(echoed, want, "{out}");
    let dir = std::fs::read_dir(w.data_dir.join("logs"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no log dir"))??
        .path();
    let mut files: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], "main.log");
    assert!(files[1].starts_with("main.log.20"), "{files:?}");
    let mut kept = Vec::new();
    for f in [&files[1], &files[0]] {
        let text = std::fs::read_to_string(dir.join(f))?;
        assert!(text.len() <= 4096, "{f} has {} bytes", text.len());
        kept.extend(
            text.lines()
                .map(|l| l.splitn(4, ' ').nth(3).unwrap_or("").to_string()),
        );
    }
    assert!(kept.len() > 50, "{kept:?}");
    assert_eq!(kept[..], want[want.len() - kept.len()..]);
    Ok(())
}

/// A WAGI pod serving the `health` guest on `/...` at `addr` (its port named `http`), the
/// folder `state` at `/state`, with `probes` (YAML lines at the container's indentation).
fn health_pod(name: &str, addr: &str, state: &Path, probes: &str) -> Result<String> {
    let port = addr.rsplit(':').next().unwrap_or_default();
    Ok(format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{addr}\"\n    alpha.wagi.krustlet.dev/modules: '{{\"hello\": {{\"route\": \"/...\"}}}}'\nspec:\n  containers:\n    - name: hello\n      image: file://{}\n      ports: [{{name: http, containerPort: {port}}}]\n      volumeMounts: [{{name: state, mountPath: /state}}]\n{probes}  volumes: [{{name: state, hostPath: {{path: {}}}}}]\n",
        guest("health")?.display(),
        state.display()
    ))
}

#[test]
fn probes_print_readiness_restart_on_liveness_failure_and_reach_only_their_pod() -> Result<()> {
    let state = tempfile::tempdir()?;
    let a = addr();
    let probed = health_pod(
        "probed",
        &a,
        state.path(),
        "      readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 1}\n      livenessProbe: {httpGet: {path: /live, port: http}, periodSeconds: 1, failureThreshold: 2}\n",
    )?;
    // An attacker's probes: another host, and a port the pod does not serve (the agent's own
    // neighbours on the machine). Neither is reached; the pod stays unready, saying why.
    let b = addr();
    let nosy = health_pod(
        "nosy",
        &b,
        state.path(),
        "      readinessProbe: {tcpSocket: {port: 22}, periodSeconds: 1}\n      livenessProbe: {httpGet: {host: 169.254.169.254, path: /latest/meta-data, port: http}, periodSeconds: 1, failureThreshold: 1000}\n",
    )?;
    // Readiness starts false while /ready fails, and turns true once it answers 200.
    std::fs::write(state.path().join("ready.fail"), "")?;
    let (mut w, _d) = run_one(
        &format!("{probed}---\n{nosy}"),
        &["--restart-backoff", "100ms"],
    )?;
    w.wait_listening(&a, T)?;
    w.wait_output(
        "default/probed/hello: not ready (readiness probe not passed)",
        T,
    )?;
    assert!(!w.output().contains("default/probed/hello: ready"));
    std::fs::remove_file(state.path().join("ready.fail"))?;
    w.wait_output("default/probed/hello: ready", T)?;
    assert_eq!(get(&a, "/live")?.body, "ok: live\n");

    // /live fails twice: the container is restarted, as a kubelet does.
    std::fs::write(state.path().join("live.fail"), "")?;
    w.wait_output(
        "default/probed: warning: Unhealthy: Liveness probe failed: HTTP probe failed with statuscode: 500",
        T,
    )?;
    let out = w.wait_output("default/probed/hello: terminated, exit code 137", T)?;
    assert!(
        out.contains("Container hello failed liveness probe, will be restarted"),
        "{out}"
    );
    std::fs::remove_file(state.path().join("live.fail"))?;
    // The new run starts unready and turns ready again; it serves.
    let until = Instant::now() + T;
    while w.output().matches("default/probed/hello: ready").count() < 2 {
        assert!(Instant::now() < until, "not ready again:\n{}", w.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    // It may be restarted once more by a failure seen just before the file went: wait for it.
    let until = Instant::now() + T;
    loop {
        match get(&a, "/live") {
            Ok(r) if (r.status, r.body.as_str()) == (200, "ok: live\n") => break,
            other => assert!(
                Instant::now() < until,
                "/live after the restart: {other:?}\n{}",
                w.output()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    w.wait_output(
        "default/nosy: warning: Unhealthy: Readiness probe failed: port 22 is not served by this pod",
        T,
    )?;
    let out = w.wait_output(
        "default/nosy: warning: Unhealthy: Liveness probe failed: probe host \"169.254.169.254\" is not the pod's address",
        T,
    )?;
    assert!(
        !out.contains("default/nosy/hello: ready"),
        "a probe of another host or port never passes:\n{out}"
    );
    // A warning that repeats every second is printed with its count, not every time.
    let out = w.wait_output("is not the pod's address 127.0.0.1: on a WebAssembly node a probe reaches only its own pod (x4)", T)?;
    let said = out
        .matches("default/nosy: warning: Unhealthy: Liveness probe failed")
        .count();
    assert_eq!(said, 3, "the 1st, 2nd and 4th:\n{out}");
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0), "{}", w.output());
    Ok(())
}
