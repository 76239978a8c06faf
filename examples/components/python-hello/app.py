"""python-hello: a wasi:http 0.2 HTTP handler in Python, built by tools/build-components with
componentize-py (PyPI) for the world wasi:http/proxy (the WIT that ships in the wasmtime-wasi-http
crate). Every path answers 200 "Hello from Python\n"; wasinode's tests use it to check that what
componentize-py builds is served like any other HTTP component."""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        response.set_status_code(200)
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        # The stream is a child of the body: drop it (leave the `with`) before finishing.
        with body.write() as stream:
            stream.blocking_write_and_flush(b"Hello from Python\n")
        OutgoingBody.finish(body, None)
