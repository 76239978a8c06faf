;; trap: `_start` executes `unreachable` at once, before writing anything.
;; Tests expect the runtime to answer 500 and log the trap, and to keep serving.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    unreachable))
