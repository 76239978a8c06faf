;; bad_header: `_start` writes the single line `this is not a cgi header block\n` to stdout and
;; exits normally. There is no `Name: value` header and no blank line ending a header block, so
;; the output is not a valid CGI response: tests expect the runtime to answer 500 (bad gateway
;; style error) rather than pass it through.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; 0..8: one iovec {ptr, len}; 8..12: nwritten; text from 64
  (data (i32.const 64) "this is not a cgi header block\n")  ;; 31 bytes

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
    (call $print (i32.const 64) (i32.const 31))))
