// http-hello-p3: a WASI 0.3 HTTP service (world wasi:http/service@0.3.0, exports
// wasi:http/handler@0.3.0) in C, with the async (callback ABI) bindings wit-bindgen generates
// (tools/build-components: --rename-world http-hello-p3). Every request: 200, text/plain,
// "Hello from a wasi:http 0.3 component\n". Each task keeps its own state (context slot 0), so one
// instance can serve several requests at once. It imports nothing from preview 1 (no adapter).
#include "http_hello_p3.h"
#include <stdlib.h>
#include <string.h>

static const char BODY[] = "Hello from a wasi:http 0.3 component\n";

typedef struct {
  http_hello_p3_waitable_set_t set;
  wasi_http_types_stream_u8_writer_t body;
  wasi_http_types_future_result_option_own_trailers_error_code_writer_t trailers;
  size_t written;
  int phase; // 0: writing the body, 1: writing the trailers, 2: done
} task_t;

static http_hello_p3_callback_code_t step(task_t *t) {
  for (;;) {
    if (t->phase == 0) {
      if (t->written == sizeof BODY - 1) {
        wasi_http_types_stream_u8_drop_writable(t->body);
        t->phase = 1;
        continue;
      }
      http_hello_p3_waitable_status_t st = wasi_http_types_stream_u8_write(
          t->body, (const uint8_t *)BODY + t->written, sizeof BODY - 1 - t->written);
      if (st == HTTP_HELLO_P3_WAITABLE_STATUS_BLOCKED) {
        http_hello_p3_waitable_join(t->body, t->set);
        return HTTP_HELLO_P3_CALLBACK_CODE_WAIT(t->set);
      }
      if (HTTP_HELLO_P3_WAITABLE_STATE(st) == HTTP_HELLO_P3_WAITABLE_DROPPED) t->written = sizeof BODY - 1;
      else t->written += HTTP_HELLO_P3_WAITABLE_COUNT(st);
    } else if (t->phase == 1) {
      wasi_http_types_result_option_own_trailers_error_code_t none;
      memset(&none, 0, sizeof none); // ok(none): no trailers
      http_hello_p3_waitable_status_t st =
          wasi_http_types_future_result_option_own_trailers_error_code_write(t->trailers, &none);
      if (st == HTTP_HELLO_P3_WAITABLE_STATUS_BLOCKED) {
        http_hello_p3_waitable_join(t->trailers, t->set);
        return HTTP_HELLO_P3_CALLBACK_CODE_WAIT(t->set);
      }
      wasi_http_types_future_result_option_own_trailers_error_code_drop_writable(t->trailers);
      t->phase = 2;
    } else {
      http_hello_p3_waitable_set_drop(t->set);
      free(t);
      http_hello_p3_context_set_0(NULL);
      return HTTP_HELLO_P3_CALLBACK_CODE_EXIT;
    }
  }
}

http_hello_p3_callback_code_t exports_wasi_http_handler_handle(exports_wasi_http_handler_own_request_t request) {
  wasi_http_types_request_drop_own(request);
  task_t *t = calloc(1, sizeof *t);
  t->set = http_hello_p3_waitable_set_new();

  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  wasi_http_types_field_name_t name;
  http_hello_p3_string_set(&name, "content-type");
  wasi_http_types_field_value_t value = {(uint8_t *)"text/plain", 10};
  wasi_http_types_header_error_t err;
  wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &name, &value, &err);

  wasi_http_types_stream_u8_t body = wasi_http_types_stream_u8_new(&t->body);
  wasi_http_types_future_result_option_own_trailers_error_code_t trailers =
      wasi_http_types_future_result_option_own_trailers_error_code_new(&t->trailers);
  wasi_http_types_tuple2_own_response_future_result_void_error_code_t made;
  wasi_http_types_static_response_new(headers, &body, trailers, &made);
  wasi_http_types_future_result_void_error_code_drop_readable(made.f1);

  exports_wasi_http_handler_result_own_response_error_code_t ret = {.is_err = false};
  ret.val.ok = made.f0;
  exports_wasi_http_handler_handle_return(ret);

  http_hello_p3_context_set_0(t);
  return step(t);
}

http_hello_p3_callback_code_t exports_wasi_http_handler_handle_callback(http_hello_p3_event_t *event) {
  task_t *t = http_hello_p3_context_get_0();
  if (event->event == HTTP_HELLO_P3_EVENT_STREAM_WRITE) {
    http_hello_p3_waitable_join(t->body, 0);
    if (HTTP_HELLO_P3_WAITABLE_STATE(event->code) == HTTP_HELLO_P3_WAITABLE_DROPPED) t->written = sizeof BODY - 1;
    else t->written += HTTP_HELLO_P3_WAITABLE_COUNT(event->code);
  } else if (event->event == HTTP_HELLO_P3_EVENT_FUTURE_WRITE) {
    http_hello_p3_waitable_join(t->trailers, 0);
    wasi_http_types_future_result_option_own_trailers_error_code_drop_writable(t->trailers);
    t->phase = 2;
  }
  return step(t);
}
