;; routes: a module with several WAGI entrypoints and dynamic routes (`_routes`).
;;
;; Exports:
;;   _start   writes `Content-Type: text/plain\n\nroot\n`   (the module's own route)
;;   _routes  writes `/one one\n/two/... two\n` to stdout: WAGI's dynamic routes, one
;;            `<path> <export>` per line, relative to the route the module is mounted at;
;;            `/two/...` is a wildcard (anything under /two)
;;   one      writes `Content-Type: text/plain\n\none\n`
;;   two      writes `Content-Type: text/plain\n\ntwo\n`
;;   memory
;; Tests mount it at e.g. /r and expect /r -> root, /r/one -> one, /r/two/x/y -> two.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; 0..8: one iovec {ptr, len}; 8..12: nwritten; texts from 64
  (data (i32.const 64)  "Content-Type: text/plain\n\nroot\n")  ;; 31 bytes
  (data (i32.const 128) "/one one\n/two/... two\n")            ;; 22 bytes
  (data (i32.const 192) "Content-Type: text/plain\n\none\n")   ;; 30 bytes
  (data (i32.const 256) "Content-Type: text/plain\n\ntwo\n")   ;; 30 bytes

  ;; Writes memory[ptr..ptr+len] to stdout, looping on short writes; traps on an error.
  (func $print (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
          (then unreachable))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  (func (export "_start")
    (call $print (i32.const 64) (i32.const 31)))
  (func (export "_routes")
    (call $print (i32.const 128) (i32.const 22)))
  (func (export "one")
    (call $print (i32.const 192) (i32.const 30)))
  (func (export "two")
    (call $print (i32.const 256) (i32.const 30))))
