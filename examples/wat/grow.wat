;; grow: `_start` grows its memory by 16 pages (1 MiB) at a time, forever, storing a word at
;; the start of every new page so the memory is really used. When `memory.grow` fails (returns
;; -1, e.g. at the runtime's memory limit or at 4 GiB) it executes `unreachable`.
;; Tests expect a memory limit to stop it (a failed grow or a trap), never the host.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $old i32)   ;; size in pages before the grow = first new page
    (local $page i32)  ;; page being touched
    (loop $grow
      (local.set $old (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old) (i32.const -1))
        (then unreachable))
      ;; touch pages $old .. $old+15
      (local.set $page (local.get $old))
      (loop $touch
        (i32.store
          (i32.mul (local.get $page) (i32.const 65536))
          (local.get $page))
        (local.set $page (i32.add (local.get $page) (i32.const 1)))
        (br_if $touch
          (i32.lt_u (local.get $page) (i32.add (local.get $old) (i32.const 16)))))
      (br $grow))))
