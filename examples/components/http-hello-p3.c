// http-hello-p3: a WASI 0.3 HTTP service (world wasinode:test/http-hello-p3 in wit-p3/: the world
// wasi:http/service@0.3.0 plus wasi:cli/environment; exports wasi:http/handler@0.3.0) in C, with
// the async (callback ABI) bindings wit-bindgen generates (tools/build-components: --rename-world
// http-hello-p3). Each task keeps its own state (context slot 0), so one instance serves several
// requests at once; every response says how many requests this instance has started
// (x-instance-requests) and how many it had in flight when the response was made
// (x-instance-in-flight). Routes are in README.md. It imports nothing from preview 1 (no adapter).
#include "http_hello_p3.h"
#include <stdlib.h>
#include <string.h>

static const char HELLO[] = "Hello from a wasi:http 0.3 component\n";
static const char SLOW[] = "slow done\n";
static const char SPUN[] = "spun\n";
static const char NOT_SET[] = "not set\n";

// This instance's counters (the instance lives across requests).
static unsigned requests, in_flight;

typedef struct {
  http_hello_p3_waitable_set_t set;
  wasi_http_types_stream_u8_writer_t body;
  wasi_http_types_future_result_option_own_trailers_error_code_writer_t trailers;
  const char *text; // the response body (owned if `owned`)
  size_t len, written;
  int owned;
  unsigned number; // this request's number in the instance
  int phase; // 0: sleeping (/slow), 1: writing the body, 2: writing the trailers, 3: done
} task_t;

// Decimal digits of n (no stdio: it would pull in preview 1).
static const char *utoa(unsigned n, char buf[16]) {
  char *p = buf + 15;
  *p = '\0';
  do *--p = (char)('0' + n % 10); while (n /= 10);
  return p;
}

static void add_header(wasi_http_types_own_fields_t fields, const char *name, const char *value) {
  wasi_http_types_field_name_t n;
  http_hello_p3_string_set(&n, name);
  wasi_http_types_field_value_t v = {(uint8_t *)value, strlen(value)};
  wasi_http_types_header_error_t err;
  wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(fields), &n, &v, &err);
}

// Returns the response (status, headers, body stream, no trailers) for the task's text.
static void respond(task_t *t, uint16_t status) {
  char num[16];
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  add_header(headers, "content-type", "text/plain");
  add_header(headers, "x-instance-requests", utoa(t->number, num));
  add_header(headers, "x-instance-in-flight", utoa(in_flight, num));

  wasi_http_types_stream_u8_t body = wasi_http_types_stream_u8_new(&t->body);
  wasi_http_types_future_result_option_own_trailers_error_code_t trailers =
      wasi_http_types_future_result_option_own_trailers_error_code_new(&t->trailers);
  wasi_http_types_tuple2_own_response_future_result_void_error_code_t made;
  wasi_http_types_static_response_new(headers, &body, trailers, &made);
  wasi_http_types_future_result_void_error_code_drop_readable(made.f1);
  wasi_http_types_method_response_set_status_code(wasi_http_types_borrow_response(made.f0), status);

  exports_wasi_http_handler_result_own_response_error_code_t ret = {.is_err = false};
  ret.val.ok = made.f0;
  exports_wasi_http_handler_handle_return(ret);
  t->phase = 1;
}

// Runs the task until it has to wait (WAIT on its set) or is done (EXIT).
static http_hello_p3_callback_code_t step(task_t *t) {
  for (;;) {
    if (t->phase == 0) {
      return HTTP_HELLO_P3_CALLBACK_CODE_WAIT(t->set); // the wait-for subtask is in the set
    } else if (t->phase == 1) {
      if (t->written == t->len) {
        wasi_http_types_stream_u8_drop_writable(t->body);
        t->phase = 2;
        continue;
      }
      http_hello_p3_waitable_status_t st =
          wasi_http_types_stream_u8_write(t->body, (const uint8_t *)t->text + t->written, t->len - t->written);
      if (st == HTTP_HELLO_P3_WAITABLE_STATUS_BLOCKED) {
        http_hello_p3_waitable_join(t->body, t->set);
        return HTTP_HELLO_P3_CALLBACK_CODE_WAIT(t->set);
      }
      if (HTTP_HELLO_P3_WAITABLE_STATE(st) == HTTP_HELLO_P3_WAITABLE_DROPPED) t->written = t->len;
      else t->written += HTTP_HELLO_P3_WAITABLE_COUNT(st);
    } else if (t->phase == 2) {
      wasi_http_types_result_option_own_trailers_error_code_t none;
      memset(&none, 0, sizeof none); // ok(none): no trailers
      http_hello_p3_waitable_status_t st =
          wasi_http_types_future_result_option_own_trailers_error_code_write(t->trailers, &none);
      if (st == HTTP_HELLO_P3_WAITABLE_STATUS_BLOCKED) {
        http_hello_p3_waitable_join(t->trailers, t->set);
        return HTTP_HELLO_P3_CALLBACK_CODE_WAIT(t->set);
      }
      wasi_http_types_future_result_option_own_trailers_error_code_drop_writable(t->trailers);
      t->phase = 3;
    } else {
      http_hello_p3_waitable_set_drop(t->set);
      if (t->owned) free((char *)t->text);
      free(t);
      http_hello_p3_context_set_0(NULL);
      in_flight--;
      return HTTP_HELLO_P3_CALLBACK_CODE_EXIT;
    }
  }
}

static int route(const char *path, const char *name, const char **query) {
  size_t n = strlen(name);
  if (strncmp(path, name, n) != 0 || (path[n] != '\0' && path[n] != '?')) return 0;
  *query = path[n] == '?' ? path + n + 1 : "";
  return 1;
}

// /env?NAME: 200 with the value (no newline) or 404.
static uint16_t env(task_t *t, const char *name) {
  http_hello_p3_list_tuple2_string_string_t vars;
  wasi_cli_environment_get_environment(&vars);
  uint16_t status = 404;
  t->text = NOT_SET;
  t->len = sizeof NOT_SET - 1;
  for (size_t i = 0; i < vars.len; i++) {
    http_hello_p3_string_t *k = &vars.ptr[i].f0, *v = &vars.ptr[i].f1;
    if (k->len == strlen(name) && memcmp(k->ptr, name, k->len) == 0) {
      char *copy = malloc(v->len + 1);
      memcpy(copy, v->ptr, v->len);
      t->text = copy;
      t->len = v->len;
      t->owned = 1;
      status = 200;
      break;
    }
  }
  http_hello_p3_list_tuple2_string_string_free(&vars);
  return status;
}

http_hello_p3_callback_code_t exports_wasi_http_handler_handle(exports_wasi_http_handler_own_request_t request) {
  in_flight++;
  task_t *t = calloc(1, sizeof *t);
  t->number = ++requests;
  t->set = http_hello_p3_waitable_set_new();
  http_hello_p3_context_set_0(t);

  char path[1024] = "/";
  http_hello_p3_string_t pq;
  if (wasi_http_types_method_request_get_path_with_query(wasi_http_types_borrow_request(request), &pq)) {
    if (pq.len < sizeof path) {
      memcpy(path, pq.ptr, pq.len);
      path[pq.len] = '\0';
    }
    http_hello_p3_string_free(&pq);
  }
  wasi_http_types_request_drop_own(request);

  const char *query;
  if (route(path, "/trap", &query)) __builtin_trap();
  if (route(path, "/slow", &query)) {
    uint64_t ns = strtoull(query, NULL, 10) * 1000000ull;
    http_hello_p3_subtask_status_t st = wasi_clocks_monotonic_clock_wait_for(ns);
    if (HTTP_HELLO_P3_SUBTASK_STATE(st) != HTTP_HELLO_P3_SUBTASK_RETURNED) {
      http_hello_p3_waitable_join(HTTP_HELLO_P3_SUBTASK_HANDLE(st), t->set);
      return step(t); // phase 0: the callback answers when the subtask returns
    }
    t->text = SLOW;
    t->len = sizeof SLOW - 1;
    respond(t, 200);
  } else if (route(path, "/spin", &query)) {
    // Computes for about N million rounds: CPU time for the tests of a service's CPU figures.
    volatile uint64_t x = 1;
    uint64_t rounds = strtoull(query, NULL, 10) * 1000000ull;
    for (uint64_t i = 0; i < rounds; i++) x = x * 6364136223846793005ull + 1442695040888963407ull;
    t->text = SPUN;
    t->len = sizeof SPUN - 1;
    respond(t, 200);
  } else if (route(path, "/env", &query)) {
    respond(t, env(t, query));
  } else {
    t->text = HELLO;
    t->len = sizeof HELLO - 1;
    respond(t, 200);
  }
  return step(t);
}

http_hello_p3_callback_code_t exports_wasi_http_handler_handle_callback(http_hello_p3_event_t *event) {
  task_t *t = http_hello_p3_context_get_0();
  if (event->event == HTTP_HELLO_P3_EVENT_SUBTASK && event->code == HTTP_HELLO_P3_SUBTASK_RETURNED) {
    http_hello_p3_waitable_join(event->waitable, 0); // /slow's wait-for is over
    http_hello_p3_subtask_drop(event->waitable);
    t->text = SLOW;
    t->len = sizeof SLOW - 1;
    respond(t, 200);
  } else if (event->event == HTTP_HELLO_P3_EVENT_STREAM_WRITE) {
    http_hello_p3_waitable_join(t->body, 0);
    if (HTTP_HELLO_P3_WAITABLE_STATE(event->code) == HTTP_HELLO_P3_WAITABLE_DROPPED) t->written = t->len;
    else t->written += HTTP_HELLO_P3_WAITABLE_COUNT(event->code);
  } else if (event->event == HTTP_HELLO_P3_EVENT_FUTURE_WRITE) {
    http_hello_p3_waitable_join(t->trailers, 0);
    wasi_http_types_future_result_option_own_trailers_error_code_drop_writable(t->trailers);
    t->phase = 3;
  }
  return step(t);
}
