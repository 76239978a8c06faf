//! The runtime crate on small WAT modules: compile once per digest (and from the disk cache),
//! per-instance memory limits, deadlines, exit codes, captured output.

use std::sync::Arc;
use std::time::Duration;

use runtime::{Invocation, RunError, Runtime, RuntimeConfig, Stream};

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hi\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 3))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

const EXIT7: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 7))))"#;

/// Two memories of 20 MiB each: one instance with a 32 MiB budget must not get both.
const TWO_MEMORIES: &str = r#"(module
  (memory $a (export "memory") 0)
  (memory $b 0)
  (func (export "_start")
    (if (i32.eq (memory.grow $a (i32.const 320)) (i32.const -1)) (then unreachable))
    (if (i32.eq (memory.grow $b (i32.const 320)) (i32.const -1)) (then unreachable))))"#;

const SPIN: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

fn rt(cache: Option<&std::path::Path>, max_memory: usize) -> Runtime {
    Runtime::new(RuntimeConfig {
        max_memory,
        max_instances: 16,
        cache_dir: cache.map(Into::into),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn compiles_once_per_digest_and_reuses_the_disk_cache() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let a = rt(Some(dir.path()), 64 << 20);
    let p1 = a
        .load("sha256:hello", HELLO.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let p2 = a
        .load("sha256:hello", b"not even wasm")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(Arc::ptr_eq(&p1, &p2), "same digest, same program");
    // A second engine (a restart) finds the precompiled artifact: the bytes are not compiled again.
    let b = rt(Some(dir.path()), 64 << 20);
    let p3 = b
        .load("sha256:hello", b"not even wasm")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = b
        .run(&p3, Invocation::new("_start"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&out.stdout[..], b"hi\n");
    // Without the cache, garbage is refused with the digest named.
    let err = rt(None, 64 << 20)
        .load("sha256:bad", b"not even wasm")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("sha256:bad") && err.contains("not valid WebAssembly"),
        "{err}"
    );
}

#[tokio::test]
async fn exit_codes_and_missing_entrypoints() {
    let r = rt(None, 64 << 20);
    let p = r
        .load("d:exit", EXIT7.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let out = r
        .run(&p, Invocation::new("_start"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.exit_code, 7);
    let err = r.run(&p, Invocation::new("nope")).await;
    assert!(
        matches!(err, Err(RunError::NoEntrypoint(ref n)) if n == "nope"),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_memory_limit_is_per_instance_not_per_memory() {
    let r = rt(None, 32 << 20);
    let p = r
        .load("d:two", TWO_MEMORIES.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let err = r.run(&p, Invocation::new("_start")).await;
    assert!(
        matches!(err, Err(RunError::MemoryLimit { limit, .. }) if limit == 32 << 20),
        "{err:?}"
    );
    // With room for both it runs.
    let r = rt(None, 64 << 20);
    let p = r
        .load("d:two", TWO_MEMORIES.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.run(&p, Invocation::new("_start")).await.is_ok());
}

// Two workers, so the spinning guest really runs beside the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_guest_is_cut_at_its_deadline_and_others_still_run() {
    let r = rt(None, 64 << 20);
    let spin = r
        .load("d:spin", SPIN.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let hello = r
        .load("d:hello", HELLO.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut inv = Invocation::new("_start");
    inv.timeout = Some(Duration::from_millis(300));
    let r2 = r.clone();
    let spinning = tokio::spawn(async move { r2.run(&spin, inv).await });
    let mut quick = Invocation::new("_start");
    quick.stdout = Stream::Capture { limit: 16 };
    let out = r.run(&hello, quick).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&out.stdout[..], b"hi\n");
    let res = spinning.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(res, Err(RunError::Timeout(_))), "{res:?}");
}

/// Traps in its start function, which is named so that its backtrace says "maximum concurrent".
const START_TRAPS: &str = r#"(module
  (memory (export "memory") 1)
  (func $maximum_concurrent_limit unreachable)
  (start $maximum_concurrent_limit)
  (func (export "_start")))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_means_the_pool_is_full_not_an_error_that_says_maximum() {
    let r = Runtime::new(RuntimeConfig {
        max_memory: 64 << 20,
        max_instances: 1,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let traps = r
        .load("d:start-traps", START_TRAPS.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let res = r.run(&traps, Invocation::new("_start")).await;
    assert!(
        matches!(&res, Err(RunError::Trap { .. })),
        "a trap, whatever its text: {res:?}"
    );

    let spin = r
        .load("d:spin", SPIN.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let hello = r
        .load("d:hello", HELLO.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let start_spinning = || {
        let mut inv = Invocation::new("_start");
        inv.timeout = Some(Duration::from_secs(60));
        let (r2, spin) = (r.clone(), spin.clone());
        tokio::spawn(async move { r2.run(&spin, inv).await })
    };
    let mut spinning = start_spinning();
    // While the spinning guest holds the only slot, others are Busy.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if spinning.is_finished() {
            // It lost the race for the slot to a hello run: that one was Busy, as it should be.
            let lost = spinning.await.unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(lost, Err(RunError::Busy)), "{lost:?}");
            spinning = start_spinning();
        }
        match r.run(&hello, Invocation::new("_start")).await {
            Err(RunError::Busy) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "never busy while the only slot is taken: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cutting it gives the slot back.
    spinning.abort();
    let _ = spinning.await;
    let out = r.run(&hello, Invocation::new("_start")).await;
    assert!(out.is_ok(), "{out:?}");
}

/// One fd_write of four iovecs (one of them empty) to stdout, one of two to stderr, one of two to
/// a descriptor that is not open; never looks at a count before the end. Exits with stdout's
/// count when stderr's is 9 and the bad descriptor's errno EBADF (8), else with 99.
const WRITEV: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "Content-Type: text/plain\n")
  (data (i32.const 200) "\n")
  (data (i32.const 300) "body\n")
  (data (i32.const 400) "one, ")
  (data (i32.const 500) "two\n")
  (func $iov (param $at i32) (param $buf i32) (param $len i32)
    (i32.store (local.get $at) (local.get $buf))
    (i32.store (i32.add (local.get $at) (i32.const 4)) (local.get $len)))
  (func (export "_start") (local $errno i32)
    (call $iov (i32.const 0) (i32.const 100) (i32.const 25))
    (call $iov (i32.const 8) (i32.const 150) (i32.const 0))
    (call $iov (i32.const 16) (i32.const 200) (i32.const 1))
    (call $iov (i32.const 24) (i32.const 300) (i32.const 5))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 4) (i32.const 1000)))
    (call $iov (i32.const 32) (i32.const 400) (i32.const 5))
    (call $iov (i32.const 40) (i32.const 500) (i32.const 4))
    (drop (call $w (i32.const 2) (i32.const 32) (i32.const 2) (i32.const 1004)))
    (local.set $errno (call $w (i32.const 9) (i32.const 32) (i32.const 2) (i32.const 1008)))
    (call $exit
      (if (result i32)
        (i32.and (i32.eq (i32.load (i32.const 1004)) (i32.const 9))
                 (i32.eq (local.get $errno) (i32.const 8)))
        (then (i32.load (i32.const 1000)))
        (else (i32.const 99))))))"#;

#[tokio::test]
async fn one_fd_write_of_several_buffers_writes_them_all() {
    let r = rt(None, 64 << 20);
    let p = r
        .load("d:writev", WRITEV.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let out = r
        .run(&p, Invocation::new("_start"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&out.stdout[..], b"Content-Type: text/plain\n\nbody\n");
    assert_eq!(&out.stderr[..], b"one, two\n");
    // 31 bytes to stdout, 9 to stderr, and EBADF for fd 9, as wasmtime-wasi says it.
    assert_eq!(out.exit_code, 31);
}

/// Asks for its environment as a preview-1 guest does, prints the strings (stdout) and the
/// pointers (stderr) it got, then asks again with buffers past the end of its memory and exits
/// with what that returned (100 more when the sizes call did not say `fault` too).
const ENVIRON: &str = r#"(module
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $sizes (i32.const 0) (i32.const 4)))
    (drop (call $get (i32.const 64) (i32.const 256)))
    (i32.store (i32.const 16) (i32.const 256))
    (i32.store (i32.const 20) (i32.load (i32.const 4)))
    (drop (call $w (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.mul (i32.load (i32.const 0)) (i32.const 4)))
    (drop (call $w (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 24)))
    (call $exit (i32.add
      (call $get (i32.const 64) (i32.const 65530))
      (i32.mul (i32.ne (call $sizes (i32.const 65534) (i32.const 4)) (i32.const 21))
               (i32.const 100))))))"#;

#[tokio::test]
async fn a_guest_reads_its_environment_in_order_and_bad_pointers_are_its_fault() {
    let r = rt(None, 64 << 20);
    let p = r
        .load("d:environ", ENVIRON.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let env = [("A", "1"), ("B", "x=y"), ("C", ""), ("D", "é")];
    let inv = Invocation {
        env: env.iter().copied().collect(),
        ..Invocation::new("_start")
    };
    let out = r.run(&p, inv).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&out.stdout[..], "A=1\0B=x=y\0C=\0D=é\0".as_bytes());
    let pointers: Vec<u32> = out
        .stderr
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(pointers, [256, 260, 266, 269]);
    // errno 21 (`fault`) from both, and the guest still ran to its exit.
    assert_eq!(out.exit_code, 21);

    // No variables: nothing to write, and the same guest runs.
    let out = r
        .run(&p, Invocation::new("_start"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(out.exit_code, 0);
}
