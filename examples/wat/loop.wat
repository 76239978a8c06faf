;; loop: `_start` spins forever without ever writing anything.
;; Tests route a request to it and expect the runtime's request timeout (epoch interruption)
;; to cut it: the request fails with a timeout status and the server stays healthy.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever
      (br $forever))))
