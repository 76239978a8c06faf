//! Components under `wasinode run`: wasi:http 0.2 handlers and wasi:cli/run commands built by
//! tools/build-components from examples/components, served and run by the real binary. Each test
//! asserts what a user observes: status codes, bodies, trailers, exit codes, log lines, the
//! agent's resident memory.

use std::io::Read;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use e2e::guests::{component, guest};
use e2e::wasinode::{
    Wasinode, download, echo_stream, find_log, free_port, get, http, run_one, upstream,
};
use tempfile::TempDir;

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// A pod of one HTTP component container on `port`, with extra container YAML (indented 6) and
/// extra metadata YAML (indented 2).
fn component_pod(name: &str, image: &Path, port: u16, container: &str, metadata: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{metadata}spec:\n  containers:\n    - name: web\n      image: file://{}\n      ports: [{{containerPort: {port}}}]\n{container}",
        image.display()
    )
}

#[test]
fn an_http_component_serves_on_its_container_port_with_env_volumes_and_logs() -> Result<()> {
    let port = free_port();
    let vol = tempfile::tempdir()?;
    std::fs::write(vol.path().join("note.txt"), "from the volume")?;
    let y = component_pod(
        "hello-component",
        &component("http-hello")?,
        port,
        &format!(
            "      env: [{{name: GREETING, value: \"hi there\"}}]\n      volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes: [{{name: data, hostPath: {{path: {}}}}}]\n",
            vol.path().display()
        ),
        "",
    );
    let (mut w, _d) = run_one(&y, &[])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    let r = get(&a, "/")?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "Hello from a wasi:http component\n")
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(get(&a, "/env?GREETING")?.body, "hi there");
    assert_eq!(get(&a, "/env?NOT_SET")?.status, 404);
    assert_eq!(get(&a, "/file?/data/note.txt")?.body, "from the volume");
    assert_eq!(
        get(&a, "/file?/etc/hostname")?.status,
        404,
        "only preopened directories are reachable"
    );
    assert_eq!(
        get(&a, "/stderr?a%20line%20for%20the%20log")?.body,
        "logged\n"
    );
    w.wait_output("[default/hello-component/web] a line for the log", T)?;
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0), "{}", w.output());
    let log = find_log(&w.data_dir, "web")?;
    assert!(log.contains("a line for the log"), "{log}");
    Ok(())
}

#[test]
fn without_a_declared_port_a_component_serves_on_8080_of_the_pod_address() -> Result<()> {
    // 8080 on loopback may be taken on a shared machine; a pod address of our own avoids that.
    let ip = format!(
        "127.0.{}.{}",
        100 + (free_port() % 100),
        1 + free_port() % 250
    );
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: no-port\nspec:\n  containers:\n    - name: web\n      image: file://{}\n",
        component("http-hello")?.display()
    );
    let (mut w, _d) = run_one(&y, &["--pod-address", &ip])?;
    let a = format!("{ip}:8080");
    w.wait_listening(&a, T)?;
    assert_eq!(get(&a, "/")?.status, 200);
    Ok(())
}

#[test]
fn one_pod_mixes_a_wagi_route_and_a_component_route() -> Result<()> {
    let a = format!("127.0.0.1:{}", free_port());
    let modules = r#"{"wagi": {"route": "/hello"}, "comp": {"route": "/env"}, "comp2": {"route": "/c/..."}, "py": {"route": "/py"}}"#;
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: mixed\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{a}\"\n    alpha.wagi.krustlet.dev/modules: '{modules}'\nspec:\n  containers:\n    - name: wagi\n      image: file://{}\n    - name: comp\n      image: file://{}\n      env: [{{name: WHO, value: component}}]\n    - name: comp2\n      image: file://{}\n    - name: py\n      image: file://{}\n",
        guest("hello")?.display(),
        component("http-hello")?.display(),
        component("http-hello")?.display(),
        component("python-hello")?.display(),
    );
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    w.wait_listening(&a, T)?;
    assert_eq!(get(&a, "/hello")?.body, "hello world\n", "the WAGI route");
    // A component sees the request's whole path, as under Spin: the route only picks it.
    assert_eq!(
        get(&a, "/env?WHO")?.body,
        "component",
        "the component route, with its own container's env"
    );
    assert_eq!(get(&a, "/c/env?WHO")?.status, 200);
    assert_eq!(
        get(&a, "/c/anything/below")?.body,
        "Hello from a wasi:http component\n"
    );
    assert_eq!(
        get(&a, "/py")?.body,
        "Hello from Python\n",
        "componentize-py"
    );
    assert_eq!(get(&a, "/cx")?.status, 404, "prefix stops at a segment");
    Ok(())
}

#[test]
fn a_100_mib_body_streams_each_way_and_the_agent_stays_small() -> Result<()> {
    let port = free_port();
    let y = component_pod("streams", &component("http-hello")?, port, "", "");
    let (mut w, _d) = run_one(&y, &["--quiet", "--request-timeout", "120s"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    assert_eq!(get(&a, "/")?.status, 200);
    let base = w.rss_kib()?;
    let size = 100 * MIB;
    let mut peak = base;

    let mut sample = |_: u64| peak = peak.max(w.rss_kib().unwrap_or(0));
    let (status, echoed, trailers) = echo_stream(&a, "/echo", size, &mut sample)?;
    assert_eq!((status, echoed), (200, size), "every byte echoed");
    assert!(
        trailers.contains(&format!("x-echo-bytes: {size}")),
        "the component's trailer reaches the client: {trailers:?}"
    );
    let (status, length, got) = download(&a, &format!("/big?{size}"), &mut sample)?;
    assert_eq!(status, 200);
    assert_eq!(length, Some(size), "the component's content-length is kept");
    assert_eq!(got, size);
    eprintln!("resident memory: {base} KiB before, {peak} KiB at most while 2 x 100 MiB streamed");
    // Neither body was ever whole in the agent: its resident memory stayed within 48 MiB of
    // where it started (a body held whole would be 100 MiB).
    assert!(
        peak < base + 48 * 1024,
        "resident memory went from {base} KiB to {peak} KiB while 100 MiB streamed"
    );
    Ok(())
}

#[test]
fn a_trap_a_hang_and_a_memory_hog_fail_only_their_own_request() -> Result<()> {
    let port = free_port();
    let y = component_pod("bad-component", &component("http-hello")?, port, "", "");
    let (mut w, _d) = run_one(
        &y,
        &[
            "--quiet",
            "--request-timeout",
            "2s",
            "--max-memory",
            "32MiB",
        ],
    )?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    let hang = {
        let a = a.clone();
        std::thread::spawn(move || get(&a, "/hang").map(|r| r.status).unwrap_or(0))
    };
    // While one instance spins, the others answer.
    assert_eq!(get(&a, "/")?.status, 200);
    assert_eq!(
        hang.join().map_err(|_| anyhow::anyhow!("panicked"))?,
        504,
        "a hanging instance is cut at the request timeout"
    );
    for _ in 0..5 {
        assert_eq!(get(&a, "/trap")?.status, 500);
        // The hog's allocations stop at the instance's limit: it is told no more memory.
        let r = get(&a, "/hog")?;
        assert_eq!((r.status, r.body.as_str()), (200, "no more memory\n"));
        // One that traps when its memory runs out fails with the limit as the reason.
        assert_eq!(get(&a, "/hog?trap")?.status, 500);
    }
    assert_eq!(get(&a, "/")?.body, "Hello from a wasi:http component\n");
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    let log = find_log(&w.data_dir, "web")?;
    assert!(log.contains("GET /trap: the module trapped"), "{log}");
    assert!(
        log.contains("GET /hang: the module did not finish within 2s"),
        "{log}"
    );
    Ok(())
}

#[test]
fn outbound_wasi_http_only_to_the_hosts_the_pod_allows() -> Result<()> {
    let allowed = upstream("allowed upstream")?;
    let other = upstream("other upstream")?;
    let port = free_port();
    let meta =
        format!("  annotations:\n    wasinode.dev/allowed-outbound-hosts: \"http://{allowed}\"\n");
    let y = component_pod("outbound", &component("http-hello")?, port, "", &meta);
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    let r = get(&a, &format!("/fetch?http://{allowed}/x"))?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "upstream 200\nallowed upstream")
    );
    let r = get(&a, &format!("/fetch?http://{other}/x"))?;
    assert_eq!((r.status, r.body.trim()), (502, "HTTP-request-denied"));
    drop(w);

    // No annotation: nothing allowed. A wildcard allows every host, but never the metadata
    // address.
    let port = free_port();
    let y = component_pod("no-outbound", &component("http-hello")?, port, "", "");
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    let r = get(&a, &format!("/fetch?http://{allowed}/x"))?;
    assert_eq!((r.status, r.body.trim()), (502, "HTTP-request-denied"));
    drop(w);
    let port = free_port();
    let meta = "  annotations:\n    wasinode.dev/allowed-outbound-hosts: \"*://*:*\"\n";
    let y = component_pod("any-outbound", &component("http-hello")?, port, "", meta);
    let (mut w, _d) = run_one(&y, &["--quiet"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    assert_eq!(
        get(&a, &format!("/fetch?http://{other}/x"))?.body,
        "upstream 200\nother upstream"
    );
    let r = get(&a, "/fetch?http://169.254.169.254/latest/meta-data/")?;
    assert_eq!((r.status, r.body.trim()), (502, "HTTP-request-denied"));
    Ok(())
}

#[test]
fn a_bad_outbound_annotation_fails_the_pod_with_the_reason() -> Result<()> {
    let port = free_port();
    let meta = "  annotations:\n    wasinode.dev/allowed-outbound-hosts: \"ftp://x\"\n";
    let y = component_pod("bad-outbound", &component("http-hello")?, port, "", meta);
    let (mut w, _d) = run_one(&y, &[])?;
    w.wait_exit(T)?;
    let out = w.output();
    assert!(
        out.contains("wasinode.dev/allowed-outbound-hosts") && out.contains("ftp://x"),
        "{out}"
    );
    Ok(())
}

/// The http-sockets component (wasi:sockets from inside the guest) in a pod whose
/// `wasinode.dev/allowed-outbound-hosts` annotation is `outbound` (none if `None`); its address.
fn sockets_pod(name: &str, outbound: Option<&str>) -> Result<(Wasinode, TempDir, String)> {
    let port = free_port();
    let meta = outbound
        .map(|o| format!("  annotations:\n    wasinode.dev/allowed-outbound-hosts: \"{o}\"\n"))
        .unwrap_or_default();
    let y = component_pod(name, &component("http-sockets")?, port, "", &meta);
    let (mut w, d) = run_one(&y, &["--quiet"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    Ok((w, d, a))
}

/// A loopback listener owned by the test (what a guest must not reach unless allowed).
fn tcp_target() -> Result<(TcpListener, String)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let a = l.local_addr()?.to_string();
    Ok((l, a))
}

/// Whether a connection is waiting on `l` right now (a refused connect makes none: the
/// host's check comes before the connect syscall, so none can still be on its way).
fn pending_connection(l: &TcpListener) -> Result<Option<TcpStream>> {
    match l.accept() {
        Ok((s, _)) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What the guest wrote on a connection it made, to the end.
fn read_line_sent(s: TcpStream) -> Result<String> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(T))?;
    let mut text = String::new();
    (&s).read_to_string(&mut text)?;
    Ok(text)
}

/// Deny by default, from the guest's side: a component's own `wasi:sockets` TCP connect to a
/// loopback listener fails with `access-denied` and the listener sees nothing, without an
/// annotation and with only an http:// entry for that very host and port; a
/// `tcp://IP:port` entry lets exactly that address through (the listener accepts the
/// connection and reads the guest's line), and no other port.
#[test]
fn a_component_connects_with_wasi_sockets_only_where_a_tcp_entry_allows() -> Result<()> {
    let (target, t) = tcp_target()?;
    let (other, o) = tcp_target()?;
    for (name, outbound) in [
        ("no-annotation", None),
        ("http-only", Some(format!("http://{t}"))),
    ] {
        let (_w, _d, a) = sockets_pod(name, outbound.as_deref())?;
        let r = get(&a, &format!("/connect?{t}"))?;
        assert_eq!(
            (r.status, r.body.as_str()),
            (502, "access-denied\n"),
            "{name}"
        );
        assert!(
            pending_connection(&target)?.is_none(),
            "{name}: the listener saw a connection"
        );
    }

    let (_w, _d, a) = sockets_pod("tcp-entry", Some(&format!("tcp://{t}")))?;
    let r = get(&a, &format!("/connect?{t}"))?;
    assert_eq!((r.status, r.body.as_str()), (200, "connected\n"));
    let conn = pending_connection(&target)?;
    let Some(conn) = conn else {
        anyhow::bail!("the guest said connected but the listener has no connection");
    };
    assert_eq!(read_line_sent(conn)?, "hello from a wasi:sockets guest\n");
    let r = get(&a, &format!("/connect?{o}"))?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (502, "access-denied\n"),
        "another port"
    );
    assert!(pending_connection(&other)?.is_none());
    Ok(())
}

/// A command component gets the outbound rules an HTTP one gets (the pod's
/// `wasinode.dev/allowed-outbound-hosts` applies to every container): its own `wasi:sockets`
/// connect is refused without a `tcp://` entry for that address (and the listener sees
/// nothing), and with one it connects and the listener reads its line.
#[test]
fn a_command_component_connects_only_where_the_pods_annotation_allows() -> Result<()> {
    let (target, t) = tcp_target()?;
    for (name, outbound, said) in [
        ("no-annotation", None, "access-denied"),
        ("http-only", Some(format!("http://{t}")), "access-denied"),
        ("tcp-entry", Some(format!("tcp://{t}")), "connected"),
    ] {
        let meta = outbound
            .map(|o| format!("  annotations:\n    wasinode.dev/allowed-outbound-hosts: \"{o}\"\n"))
            .unwrap_or_default();
        let y = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{meta}spec:\n  restartPolicy: Never\n  containers:\n    - name: main\n      image: file://{}\n      args: [--connect, \"{t}\"]\n",
            component("command-hello")?.display()
        );
        let (mut w, _d) = run_one(&y, &[])?;
        w.wait_exit(T)?;
        let out = w.output();
        assert!(
            out.contains(&format!("[default/{name}/main] connect {t}: {said}\n")),
            "{name}: {out}"
        );
        let conn = pending_connection(&target)?;
        match (said, conn) {
            ("connected", Some(c)) => {
                assert_eq!(read_line_sent(c)?, "hello from a wasi:sockets command\n")
            }
            ("connected", None) => anyhow::bail!("{name}: connected, but the listener has none"),
            (_, Some(_)) => anyhow::bail!("{name}: refused, but the listener saw a connection"),
            (_, None) => {}
        }
    }
    Ok(())
}

/// What the README promises `wasi:sockets` never does, even under entries that allow TCP
/// connections (`tcp://IP:port`, and Spin's `*://*:*`): listen (binding the wildcard address
/// comes with a connect, so bind is allowed but listening on it is not, nor binding a port),
/// UDP (the test's own UDP socket receives nothing), name lookups, and the metadata address.
#[test]
fn wasi_sockets_never_listen_send_udp_or_look_up_names_even_under_wildcards() -> Result<()> {
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    udp.set_nonblocking(true)?;
    let u = udp.local_addr()?.to_string();
    let (target, t) = tcp_target()?;
    for (name, outbound) in [
        ("tcp-entry", format!("tcp://{t}, tcp://{u}")),
        ("wildcard", "*://*:*".to_string()),
    ] {
        let (_w, _d, a) = sockets_pod(name, Some(&outbound))?;
        // TCP connect works under both, so what follows is refused for what it is.
        assert_eq!(
            get(&a, &format!("/connect?{t}"))?.body,
            "connected\n",
            "{name}"
        );
        assert!(pending_connection(&target)?.is_some(), "{name}");

        let port = free_port();
        for path in [format!("/listen?{port}"), "/listen?0".to_string()] {
            let r = get(&a, &path)?;
            assert_eq!(
                (r.status, r.body.as_str()),
                (502, "access-denied\n"),
                "{name} {path}"
            );
        }
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{name}: nothing listens on {port}"
        );
        let r = get(&a, &format!("/udp?{u}"))?;
        assert_eq!(
            (r.status, r.body.as_str()),
            (502, "access-denied\n"),
            "{name} udp"
        );
        let mut buf = [0u8; 64];
        let got = udp.recv(&mut buf);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "{name}: a datagram arrived: {got:?}"
        );
        let r = get(&a, "/lookup?localhost")?;
        assert_eq!(r.status, 502, "{name}: a name lookup answered {}", r.body);
        let r = get(&a, "/connect?169.254.169.254:80")?;
        assert_eq!(
            (r.status, r.body.as_str()),
            (502, "access-denied\n"),
            "{name} metadata"
        );
    }
    Ok(())
}

#[test]
fn a_command_component_gets_args_env_volumes_and_exits_with_its_code() -> Result<()> {
    let vol = tempfile::tempdir()?;
    std::fs::write(vol.path().join("x.txt"), "read through a preopen")?;
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: cmd\nspec:\n  restartPolicy: Never\n  containers:\n    - name: main\n      image: file://{}\n      command: [first]\n      args: [second, --read, /data/x.txt, --exit, \"3\"]\n      env: [{{name: GREETING, value: hello}}]\n      volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes: [{{name: data, hostPath: {{path: {}}}}}]\n",
        component("command-hello")?.display(),
        vol.path().display()
    );
    let (mut w, _d) = run_one(&y, &[])?;
    let st = w.wait_exit(T)?;
    let out = w.output();
    assert_eq!(
        st.code(),
        Some(1),
        "a failed pod makes run exit non-zero\n{out}"
    );
    assert!(out.contains("[default/cmd/main] arg 1: first"), "{out}");
    assert!(out.contains("[default/cmd/main] arg 2: second"), "{out}");
    assert!(
        out.contains("[default/cmd/main] env GREETING=hello"),
        "{out}"
    );
    assert!(
        out.contains("[default/cmd/main] read through a preopen"),
        "{out}"
    );
    assert!(out.contains("[default/cmd/main] to stderr"), "{out}");
    // Through the preview-1 adapter a component's exit status is wasi:cli/exit's result: a
    // non-zero code arrives as failure, which is exit code 1 (as `wasmtime run` reports it).
    assert!(out.contains("exit code 1 (Error)"), "{out}");
    assert!(out.contains("default/cmd: Failed"), "{out}");
    Ok(())
}

/// A command that calls `wasi:cli/exit.exit-with-code(N)` itself (not through the preview-1
/// adapter, which can only say failure) ends with exit code N: the pod's container status shows
/// it, and 0 is success.
#[test]
fn a_command_component_that_calls_exit_with_code_ends_with_that_code() -> Result<()> {
    for (code, status, phase) in [
        (42, "exit code 42 (Error)", "Failed"),
        (3, "exit code 3 (Error)", "Failed"),
        (0, "exit code 0 (Completed)", "Succeeded"),
    ] {
        let y = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: exits\nspec:\n  restartPolicy: Never\n  containers:\n    - name: main\n      image: file://{}\n      args: [--exit-with-code, \"{code}\"]\n",
            component("command-hello")?.display()
        );
        let (mut w, _d) = run_one(&y, &[])?;
        let st = w.wait_exit(T)?;
        let out = w.output();
        assert!(
            out.contains(&format!("default/exits/main: terminated, {status}")),
            "{out}"
        );
        assert!(out.contains(&format!("default/exits: {phase}")), "{out}");
        assert_eq!(st.code(), Some(i32::from(code != 0)), "{out}");
    }
    Ok(())
}

#[test]
fn a_failing_command_component_is_restarted_with_back_off() -> Result<()> {
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: crashy\nspec:\n  restartPolicy: OnFailure\n  containers:\n    - name: main\n      image: file://{}\n      args: [--exit, \"1\"]\n",
        component("command-hello")?.display()
    );
    let (mut w, _d) = run_one(&y, &["--quiet", "--restart-backoff", "100ms"])?;
    w.wait_output("restarts 2", T)?;
    w.wait_output("CrashLoopBackOff", T)?;
    Ok(())
}

#[test]
fn a_component_that_exports_nothing_servable_is_refused_naming_its_exports() -> Result<()> {
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nothing\nspec:\n  containers:\n    - name: main\n      image: file://{}\n",
        component("reactor-nothing")?.display()
    );
    let (mut w, _d) = run_one(&y, &[])?;
    w.wait_exit(T)?;
    let out = w.output();
    assert!(
        out.contains("exports neither wasi:http/incoming-handler")
            && out.contains("wasinode:test/nothing"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_command_component_cannot_be_named_as_a_wagi_route() -> Result<()> {
    let a = format!("127.0.0.1:{}", free_port());
    let y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: cmd-route\n  annotations:\n    alpha.wagi.krustlet.dev/default-host: \"{a}\"\n    alpha.wagi.krustlet.dev/modules: '{{\"main\": {{\"route\": \"/x\"}}}}'\nspec:\n  containers:\n    - name: main\n      image: file://{}\n",
        component("command-hello")?.display()
    );
    let (mut w, _d) = run_one(&y, &[])?;
    w.wait_exit(T)?;
    let out = w.output();
    assert!(
        out.contains("wasi:cli command component, which cannot serve route /x"),
        "{out}"
    );
    let r = http("GET", &a, "/x", &[], b"");
    assert!(r.is_err(), "nothing listens: {r:?}");
    Ok(())
}

#[test]
fn a_wasi_0_3_service_serves_concurrent_requests_from_one_reused_instance() -> Result<()> {
    let port = free_port();
    let y = component_pod(
        "p3-service",
        &component("http-hello-p3")?,
        port,
        "      env: [{name: GREETING, value: from-0.3}]\n",
        "",
    );
    let (mut w, _d) = run_one(&y, &["--quiet", "--request-timeout", "3s"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    // A burst that finds no instance yet starts one per request (wasmtime-wasi-http's
    // ProxyHandler counts a worker once it is instantiated), and each serving thread keeps its
    // own instances, each new connection going to the next thread: a request per thread (two
    // on these machines) first makes the instances that the burst then shares.
    for _ in 0..2 {
        assert_eq!(get(&a, "/")?.status, 200);
    }
    // Eight requests at once, each waiting 500 ms inside the guest (wasi:clocks wait-for).
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || get(&a, "/slow?500"))
        })
        .collect();
    let mut in_flight = Vec::new();
    let mut numbers: Vec<u64> = Vec::new();
    for t in burst {
        let r = t.join().map_err(|_| anyhow::anyhow!("panicked"))??;
        assert_eq!((r.status, r.body.as_str()), (200, "slow done\n"));
        let n = |h: &str| -> u64 { r.header(h).and_then(|v| v.parse().ok()).unwrap_or(0) };
        in_flight.push(n("x-instance-in-flight"));
        numbers.push(n("x-instance-requests"));
    }
    assert!(
        in_flight.iter().any(|k| *k > 1),
        "one instance had several requests in flight at once: in-flight {in_flight:?}"
    );
    // Every request was counted by the instance that served it (a burst may spread over a few
    // instances, so the numbers need not be 1..8; none is missing its header).
    assert!(numbers.iter().all(|n| *n >= 1), "numbers: {numbers:?}");
    assert_eq!(get(&a, "/env?GREETING")?.body, "from-0.3");
    assert_eq!(
        get(&a, "/slow?60000")?.status,
        504,
        "a request past the request timeout"
    );
    drop(w);

    // Each serving thread keeps instances of its own, and each new connection goes to the next
    // thread: with two, four connections one after another meet two instances, twice each.
    let port = free_port();
    let y = component_pod("p3-lanes", &component("http-hello-p3")?, port, "", "");
    let (mut w, _d) = run_one(&y, &["--quiet", "--serve-threads", "2"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    let mut numbers = Vec::new();
    for _ in 0..4 {
        let r = get(&a, "/")?;
        assert_eq!(r.status, 200);
        numbers.push(r.header("x-instance-requests").map(String::from));
    }
    let n = |s: &str| Some(s.to_string());
    assert_eq!(
        numbers,
        [n("1"), n("1"), n("2"), n("2")],
        "one instance per thread"
    );
    drop(w);

    // A trap fails its request and retires the instance: the next request meets a new one.
    // Instances are kept per serving thread and each new connection goes to the next thread,
    // so with one serving thread every connection meets the same instance.
    let port = free_port();
    let y = component_pod("p3-trap", &component("http-hello-p3")?, port, "", "");
    let (mut w, _d) = run_one(&y, &["--quiet", "--serve-threads", "1"])?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    let seq = |path: &str| -> Result<(u16, Option<String>)> {
        let r = get(&a, path)?;
        Ok((r.status, r.header("x-instance-requests").map(String::from)))
    };
    assert_eq!(seq("/")?, (200, Some("1".into())));
    assert_eq!(seq("/")?, (200, Some("2".into())), "the instance is reused");
    assert_eq!(seq("/trap")?.0, 500);
    assert_eq!(
        seq("/")?,
        (200, Some("1".into())),
        "a new instance after the trap"
    );
    w.signal("INT")?;
    assert_eq!(w.wait_exit(T)?.code(), Some(0));
    let log = find_log(&w.data_dir, "web")?;
    assert!(log.contains("service instance was retired"), "{log}");
    Ok(())
}

#[test]
fn a_client_that_stops_reading_holds_no_instance_past_the_deadline() -> Result<()> {
    let port = free_port();
    let y = component_pod("stalled", &component("http-hello")?, port, "", "");
    let (mut w, _d) = run_one(
        &y,
        &[
            "--quiet",
            "--request-timeout",
            "2s",
            "--max-instances-per-pod",
            "1",
        ],
    )?;
    let a = format!("127.0.0.1:{port}");
    w.wait_listening(&a, T)?;
    // Ask for 200 MiB and never read it: the guest blocks on a full socket.
    let mut stalled = std::net::TcpStream::connect(&a)?;
    std::io::Write::write_all(
        &mut stalled,
        format!("GET /big?{} HTTP/1.1\r\nHost: x\r\n\r\n", 200 * MIB).as_bytes(),
    )?;
    // The deadline cuts the instance, the log says so, and the pod's only slot is free again
    // while the stalled connection is still open.
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = find_log(&w.data_dir, "web").unwrap_or_default();
        if log.contains(
            "the response was cut after its head was sent: the module did not finish within 2s",
        ) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cut in the log: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = get(&a, "/")?;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "Hello from a wasi:http component\n"),
        "the slot came back with the instance, not with the stalled client"
    );
    drop(stalled);
    Ok(())
}
