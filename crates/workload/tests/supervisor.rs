//! The Supervisor as a front end drives it: a pod is started once however many starts race,
//! a pod stopped while it starts leaves nothing running, and a finished command pod is
//! forgotten.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use workload::{Images, LocalImages, LogStore, PlanContext, PullRetry, Reporter, Supervisor};

/// A WAGI module that answers every request with a CGI response.
const HELLO_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Content-Type: text/plain\n\nhello\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 33))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// A WASI command that exits 0 at once.
const DONE_WAT: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

fn supervisor(dir: &std::path::Path) -> Supervisor {
    let rt = runtime::Runtime::new(runtime::RuntimeConfig {
        max_instances: 16,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("runtime: {e}"));
    let images = Images::new(
        None,
        PullRetry {
            attempts: 1,
            first_delay: Duration::from_millis(10),
        },
    );
    let logs = LogStore::start(dir.join("logs"), false);
    let (reporter, mut rx) = Reporter::channel();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    Supervisor::new(rt, images, logs, reporter, Default::default())
}

fn pod(name: &str, module: &Path, wagi_port: Option<u16>) -> Pod {
    let mut pod = serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": format!("file://{}", module.display())}]},
    });
    if let Some(port) = wagi_port {
        pod["metadata"]["annotations"] = serde_json::json!({
            "alpha.wagi.krustlet.dev/default-host": format!("127.0.0.1:{port}"),
            "alpha.wagi.krustlet.dev/modules": r#"{"c": {"route": "/"}}"#,
        });
    }
    serde_json::from_value(pod).unwrap_or_else(|e| panic!("pod: {e}"))
}

fn ctx(dir: &std::path::Path) -> PlanContext {
    PlanContext {
        volume_dir: dir.join("volumes"),
        local_images: LocalImages::Any,
        ..Default::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("port: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_of_one_pod_start_it_once() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let module = dir.path().join("hello.wat");
    std::fs::write(&module, HELLO_WAT).unwrap_or_else(|e| panic!("{e}"));
    let sup = supervisor(dir.path());
    let port = free_port();
    let p = Arc::new(pod("web", &module, Some(port)));
    let ctx = Arc::new(ctx(dir.path()));
    let starts = (0..8).map(|_| {
        let (sup, p, ctx) = (sup.clone(), p.clone(), ctx.clone());
        tokio::spawn(async move { sup.try_start(&p, &ctx, None).await })
    });
    let results: Vec<_> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("task: {e}")))
        .collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| e.reason == "AlreadyRunning"))
        .count();
    assert_eq!((ok, refused), (1, 7), "{results:?}");
    assert_eq!(sup.running().len(), 1);
    let key = workload::plan::pod_key(&p);
    assert!(sup.stop(&key, Duration::from_secs(1)).await);
    assert!(sup.running().is_empty());
    // The port is free again: nothing of the pod is left listening.
    std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("port {port} still taken after stop: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_stopped_while_starting_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let module = dir.path().join("hello.wat");
    std::fs::write(&module, HELLO_WAT).unwrap_or_else(|e| panic!("{e}"));
    let sup = supervisor(dir.path());
    let port = free_port();
    let p = pod("racer", &module, Some(port));
    let key = workload::plan::pod_key(&p);
    let ctx = ctx(dir.path());
    let start = {
        let (sup, p, ctx) = (sup.clone(), p.clone(), ctx.clone());
        tokio::spawn(async move { sup.try_start(&p, &ctx, None).await })
    };
    // Stop as soon as the start has reserved the pod (it then reads and compiles the module).
    while !sup.running().contains(&key) && !start.is_finished() {
        tokio::task::yield_now().await;
    }
    sup.stop(&key, Duration::from_secs(1)).await;
    let _ = start.await;
    assert!(sup.running().is_empty(), "{:?}", sup.running());
    std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("port {port} taken by a pod that was stopped: {e}"));
    // And the pod can be started again afterwards.
    sup.try_start(&p, &ctx, None)
        .await
        .unwrap_or_else(|e| panic!("restart: {e}"));
    sup.stop_all(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_command_pod_is_forgotten() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let module = dir.path().join("done.wat");
    std::fs::write(&module, DONE_WAT).unwrap_or_else(|e| panic!("{e}"));
    let sup = supervisor(dir.path());
    let p = pod("job", &module, None);
    sup.try_start(&p, &ctx(dir.path()), None)
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    tokio::time::timeout(Duration::from_secs(30), sup.finished())
        .await
        .unwrap_or_else(|_| panic!("the command never finished"));
    let key = workload::plan::pod_key(&p);
    assert!(
        !sup.stop(&key, Duration::from_secs(1)).await,
        "the supervisor still holds a finished pod"
    );
}
