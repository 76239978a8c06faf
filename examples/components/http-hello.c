// http-hello: a wasi:http 0.2 HTTP handler (exports wasi:http/incoming-handler) for wasinode's
// tests, written against the C bindings wit-bindgen generates for the world `http-hello` in
// wit/http-hello.wit (wasi:http/proxy plus wasi:cli/environment and wasi:filesystem/preopens).
// Built by tools/build-components; every route is described in examples/components/README.md.
//
// Ownership rules of the bindings: a result an import returns was allocated by the guest's
// cabi_realloc and is freed with its *_free function; an `own` handle is dropped with
// *_drop_own; arguments passed to an import stay the caller's.

#include "http_hello.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK (64 * 1024) // the most a body is read or written at once

typedef wasi_http_types_own_response_outparam_t outparam_t;
typedef wasi_io_streams_own_output_stream_t ostream_t;
typedef wasi_io_streams_own_input_stream_t istream_t;

// The names of wasi:http/types.error-code's cases, in the WIT's order (the variant's tag).
static const char *const ERROR_CODE_NAMES[] = {
    "DNS-timeout", "DNS-error", "destination-not-found", "destination-unavailable",
    "destination-IP-prohibited", "destination-IP-unroutable", "connection-refused",
    "connection-terminated", "connection-timeout", "connection-read-timeout",
    "connection-write-timeout", "connection-limit-reached", "TLS-protocol-error",
    "TLS-certificate-error", "TLS-alert-received", "HTTP-request-denied",
    "HTTP-request-length-required", "HTTP-request-body-size", "HTTP-request-method-invalid",
    "HTTP-request-URI-invalid", "HTTP-request-URI-too-long", "HTTP-request-header-section-size",
    "HTTP-request-header-size", "HTTP-request-trailer-section-size", "HTTP-request-trailer-size",
    "HTTP-response-incomplete", "HTTP-response-header-section-size", "HTTP-response-header-size",
    "HTTP-response-body-size", "HTTP-response-trailer-section-size", "HTTP-response-trailer-size",
    "HTTP-response-transfer-coding", "HTTP-response-content-coding", "HTTP-response-timeout",
    "HTTP-upgrade-failed", "HTTP-protocol-error", "loop-detected", "configuration-error",
    "internal-error",
};

static const char *error_code_name(const wasi_http_types_error_code_t *code) {
  size_t n = sizeof ERROR_CODE_NAMES / sizeof ERROR_CODE_NAMES[0];
  return code->tag < n ? ERROR_CODE_NAMES[code->tag] : "unknown-error-code";
}

// ---- streams ---------------------------------------------------------------------------------

static void drop_stream_error(wasi_io_streams_stream_error_t *err) {
  if (err->tag == WASI_IO_STREAMS_STREAM_ERROR_LAST_OPERATION_FAILED)
    wasi_io_error_error_drop_own(err->val.last_operation_failed);
}

// Writes all of buf, waiting for the stream's write permit (check-write) as wasi:io asks.
static bool write_all(ostream_t out, const void *buf, size_t len) {
  wasi_io_streams_borrow_output_stream_t o = wasi_io_streams_borrow_output_stream(out);
  const uint8_t *p = buf;
  while (len > 0) {
    uint64_t permit;
    wasi_io_streams_stream_error_t err;
    if (!wasi_io_streams_method_output_stream_check_write(o, &permit, &err)) {
      drop_stream_error(&err);
      return false;
    }
    if (permit == 0) {
      wasi_io_poll_own_pollable_t ready = wasi_io_streams_method_output_stream_subscribe(o);
      wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
      wasi_io_poll_pollable_drop_own(ready);
      continue;
    }
    size_t n = len < permit ? len : (size_t)permit;
    http_hello_list_u8_t chunk = {(uint8_t *)p, n};
    if (!wasi_io_streams_method_output_stream_write(o, &chunk, &err)) {
      drop_stream_error(&err);
      return false;
    }
    p += n;
    len -= n;
  }
  return true;
}

static bool write_str(ostream_t out, const char *s) { return write_all(out, s, strlen(s)); }

static bool flush(ostream_t out) {
  wasi_io_streams_stream_error_t err;
  if (!wasi_io_streams_method_output_stream_blocking_flush(
          wasi_io_streams_borrow_output_stream(out), &err)) {
    drop_stream_error(&err);
    return false;
  }
  return true;
}

// Copies `in` to `out` CHUNK bytes at most at a time until `in` ends; counts the bytes.
// Returns false if either side failed (not when `in` is simply closed).
static bool copy_stream(istream_t in, ostream_t out, uint64_t *copied) {
  wasi_io_streams_borrow_input_stream_t i = wasi_io_streams_borrow_input_stream(in);
  *copied = 0;
  for (;;) {
    http_hello_list_u8_t chunk;
    wasi_io_streams_stream_error_t err;
    if (!wasi_io_streams_method_input_stream_blocking_read(i, CHUNK, &chunk, &err)) {
      bool closed = err.tag == WASI_IO_STREAMS_STREAM_ERROR_CLOSED;
      drop_stream_error(&err);
      return closed;
    }
    bool ok = write_all(out, chunk.ptr, chunk.len);
    *copied += chunk.len;
    http_hello_list_u8_free(&chunk);
    if (!ok) return false;
  }
}

// ---- responses -------------------------------------------------------------------------------

static void add_header(wasi_http_types_own_fields_t fields, const char *name, const void *value,
                       size_t len) {
  wasi_http_types_field_name_t n;
  http_hello_string_set(&n, name);
  wasi_http_types_field_value_t v = {(uint8_t *)value, len};
  wasi_http_types_header_error_t err;
  wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(fields), &n, &v, &err);
}

// A response whose head is sent (set on the outparam) and whose body is being written.
typedef struct {
  wasi_http_types_own_outgoing_body_t body;
  ostream_t stream;
} response_t;

// Sends the head: `status` and the headers in `headers` (taken), then opens the body.
static response_t respond_with(outparam_t outparam, uint16_t status,
                               wasi_http_types_own_fields_t headers) {
  wasi_http_types_own_outgoing_response_t resp = wasi_http_types_constructor_outgoing_response(headers);
  wasi_http_types_borrow_outgoing_response_t r = wasi_http_types_borrow_outgoing_response(resp);
  wasi_http_types_method_outgoing_response_set_status_code(r, status);
  response_t out;
  wasi_http_types_method_outgoing_response_body(r, &out.body);
  wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
  result.val.ok = resp;
  wasi_http_types_static_response_outparam_set(outparam, &result);
  wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(out.body),
                                             &out.stream);
  return out;
}

static response_t respond(outparam_t outparam, uint16_t status, const char *content_type) {
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  if (content_type) add_header(headers, "content-type", content_type, strlen(content_type));
  return respond_with(outparam, status, headers);
}

// Ends the body (the stream must be dropped first), with optional trailers (taken).
static void finish(response_t resp, wasi_http_types_own_trailers_t *trailers) {
  flush(resp.stream);
  wasi_io_streams_output_stream_drop_own(resp.stream);
  wasi_http_types_error_code_t err;
  if (!wasi_http_types_static_outgoing_body_finish(resp.body, trailers, &err))
    wasi_http_types_error_code_free(&err);
}

static void respond_text(outparam_t outparam, uint16_t status, const char *text) {
  response_t resp = respond(outparam, status, "text/plain");
  write_str(resp.stream, text);
  finish(resp, NULL);
}

// ---- requests --------------------------------------------------------------------------------

// Decodes %XX escapes in place.
static void percent_decode(char *s) {
  char *w = s;
  for (char *r = s; *r; r++) {
    if (r[0] == '%' && r[1] && r[2]) {
      char hex[3] = {r[1], r[2], 0};
      char *end;
      long v = strtol(hex, &end, 16);
      if (*end == 0) {
        *w++ = (char)v;
        r += 2;
        continue;
      }
    }
    *w++ = *r;
  }
  *w = 0;
}

// Copies the request's body to `out`; returns the bytes copied.
static bool copy_request_body(wasi_http_types_borrow_incoming_request_t req, ostream_t out,
                              uint64_t *copied) {
  *copied = 0;
  wasi_http_types_own_incoming_body_t body;
  if (!wasi_http_types_method_incoming_request_consume(req, &body)) return false;
  istream_t in;
  bool ok = false;
  if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &in)) {
    ok = copy_stream(in, out, copied);
    wasi_io_streams_input_stream_drop_own(in);
  }
  wasi_http_types_future_trailers_drop_own(wasi_http_types_static_incoming_body_finish(body));
  return ok;
}

// ---- routes ----------------------------------------------------------------------------------

static void route_env(outparam_t outparam, const char *name) {
  http_hello_list_tuple2_string_string_t env;
  wasi_cli_environment_get_environment(&env);
  const http_hello_string_t *value = NULL;
  for (size_t i = 0; i < env.len && !value; i++) {
    const http_hello_string_t *k = &env.ptr[i].f0;
    if (k->len == strlen(name) && memcmp(k->ptr, name, k->len) == 0) value = &env.ptr[i].f1;
  }
  if (value) {
    response_t resp = respond(outparam, 200, "text/plain");
    write_all(resp.stream, value->ptr, value->len);
    finish(resp, NULL);
  } else {
    respond_text(outparam, 404, "not set\n");
  }
  http_hello_list_tuple2_string_string_free(&env);
}

static void route_echo(wasi_http_types_borrow_incoming_request_t req, outparam_t outparam) {
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  wasi_http_types_own_headers_t req_headers = wasi_http_types_method_incoming_request_headers(req);
  wasi_http_types_field_name_t ct;
  http_hello_string_set(&ct, "content-type");
  wasi_http_types_list_field_value_t values;
  wasi_http_types_method_fields_get(wasi_http_types_borrow_fields(req_headers), &ct, &values);
  for (size_t i = 0; i < values.len; i++)
    add_header(headers, "content-type", values.ptr[i].ptr, values.ptr[i].len);
  wasi_http_types_list_field_value_free(&values);
  wasi_http_types_fields_drop_own(req_headers);
  // Declared, so that HTTP/1.1 servers send it (RFC 9110 6.6.2; hyper drops undeclared ones).
  add_header(headers, "trailer", "x-echo-bytes", 12);

  response_t resp = respond_with(outparam, 200, headers);
  uint64_t copied;
  copy_request_body(req, resp.stream, &copied);
  char count[24];
  int n = snprintf(count, sizeof count, "%llu", (unsigned long long)copied);
  wasi_http_types_own_trailers_t trailers = wasi_http_types_constructor_fields();
  add_header(trailers, "x-echo-bytes", count, (size_t)n);
  finish(resp, &trailers);
}

// Reads at most `cap` bytes of the request's body into `buf`; returns how many (or -1).
static long read_request_body(wasi_http_types_borrow_incoming_request_t req, uint8_t *buf,
                              size_t cap) {
  wasi_http_types_own_incoming_body_t body;
  if (!wasi_http_types_method_incoming_request_consume(req, &body)) return -1;
  istream_t in;
  long got = -1;
  if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &in)) {
    got = 0;
    for (;;) {
      http_hello_list_u8_t chunk;
      wasi_io_streams_stream_error_t err;
      if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(in),
                                                             CHUNK, &chunk, &err)) {
        drop_stream_error(&err);
        break;
      }
      size_t take = chunk.len < cap - (size_t)got ? chunk.len : cap - (size_t)got;
      memcpy(buf + got, chunk.ptr, take);
      got += (long)take;
      http_hello_list_u8_free(&chunk);
    }
    wasi_io_streams_input_stream_drop_own(in);
  }
  wasi_http_types_future_trailers_drop_own(wasi_http_types_static_incoming_body_finish(body));
  return got;
}

// grpc.health.v1.Health/Check (what a kubelet's gRPC probe calls): the HealthCheckRequest's
// service "" (the server) is SERVING, "down" is NOT_SERVING, any other is unknown (NOT_FOUND).
static void route_grpc_health(wasi_http_types_borrow_incoming_request_t req, outparam_t outparam) {
  uint8_t in[256];
  long n = read_request_body(req, in, sizeof in);
  const char *service = "";
  size_t service_len = 0;
  // A gRPC frame (flag, 4-byte length) holding field 1 (tag 0x0a), a short string.
  if (n >= 7 && in[5] == 0x0a && in[6] < 0x80 && 7 + (long)in[6] <= n) {
    service = (const char *)in + 7;
    service_len = in[6];
  }
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  add_header(headers, "content-type", "application/grpc", 16);
  add_header(headers, "trailer", "grpc-status", 11);
  response_t resp = respond_with(outparam, 200, headers);
  wasi_http_types_own_trailers_t trailers = wasi_http_types_constructor_fields();
  if (service_len == 0 || (service_len == 4 && memcmp(service, "down", 4) == 0)) {
    uint8_t status = service_len == 0 ? 1 : 2; // SERVING, NOT_SERVING
    uint8_t msg[] = {0, 0, 0, 0, 2, 0x08, status};
    write_all(resp.stream, msg, sizeof msg);
    add_header(trailers, "grpc-status", "0", 1);
  } else {
    add_header(trailers, "grpc-status", "5", 1);
    add_header(trailers, "grpc-message", "unknown service", 15);
  }
  finish(resp, &trailers);
}

static void route_big(outparam_t outparam, const char *arg) {
  char *end;
  unsigned long long total = strtoull(arg, &end, 10);
  if (*arg == 0 || *end != 0) {
    respond_text(outparam, 400, "usage: /big?N (a byte count)\n");
    return;
  }
  static uint8_t xs[CHUNK];
  memset(xs, 'x', sizeof xs);
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  add_header(headers, "content-type", "application/octet-stream", 24);
  char len[24];
  int n = snprintf(len, sizeof len, "%llu", total);
  add_header(headers, "content-length", len, (size_t)n);
  response_t resp = respond_with(outparam, 200, headers);
  for (unsigned long long left = total; left > 0;) {
    size_t step = left < CHUNK ? (size_t)left : CHUNK;
    if (!write_all(resp.stream, xs, step)) break;
    left -= step;
  }
  finish(resp, NULL);
}

static void route_stderr(outparam_t outparam, const char *text) {
  ostream_t err = wasi_cli_stderr_get_stderr();
  write_str(err, text);
  write_str(err, "\n");
  flush(err);
  wasi_io_streams_output_stream_drop_own(err);
  respond_text(outparam, 200, "logged\n");
}

static void route_hang(void) {
  volatile uint64_t counter = 0;
  for (;;) counter++;
}

// Keeps every block reachable so the compiler cannot drop the allocations.
static void *volatile hog_list;

// `/hog`: allocate until malloc fails, then say so; `/hog?trap`: then trap, as a program that
// cannot handle running out of memory does.
static void route_hog(outparam_t outparam, const char *query) {
  for (;;) {
    volatile uint8_t *block = malloc(1 << 20);
    if (!block) {
      if (query && strcmp(query, "trap") == 0) __builtin_trap();
      break;
    }
    for (size_t i = 0; i < (1 << 20); i += 4096) block[i] = 1; // touch every page
    *(void *volatile *)block = hog_list;
    hog_list = (void *)block;
  }
  respond_text(outparam, 200, "no more memory\n");
}

// Splits "http://host[:port][/path?query]" (or https) into its parts; false if it is not one.
static bool parse_url(const char *url, wasi_http_types_scheme_t *scheme, char *authority,
                      size_t cap, const char **path) {
  const char *rest;
  if (strncmp(url, "http://", 7) == 0) {
    scheme->tag = WASI_HTTP_TYPES_SCHEME_HTTP;
    rest = url + 7;
  } else if (strncmp(url, "https://", 8) == 0) {
    scheme->tag = WASI_HTTP_TYPES_SCHEME_HTTPS;
    rest = url + 8;
  } else {
    return false;
  }
  size_t n = strcspn(rest, "/?");
  if (n == 0 || n >= cap) return false;
  memcpy(authority, rest, n);
  authority[n] = 0;
  *path = rest[n] ? rest + n : "/";
  return true;
}

static void respond_upstream_error(outparam_t outparam, const wasi_http_types_error_code_t *code) {
  response_t resp = respond(outparam, 502, "text/plain");
  write_str(resp.stream, error_code_name(code));
  write_str(resp.stream, "\n");
  finish(resp, NULL);
}

static void route_fetch(outparam_t outparam, const char *url) {
  wasi_http_types_scheme_t scheme;
  char authority[256];
  const char *path;
  if (!parse_url(url, &scheme, authority, sizeof authority, &path)) {
    respond_text(outparam, 400, "usage: /fetch?http://host:port/path\n");
    return;
  }
  wasi_http_types_own_outgoing_request_t req =
      wasi_http_types_constructor_outgoing_request(wasi_http_types_constructor_fields());
  wasi_http_types_borrow_outgoing_request_t r = wasi_http_types_borrow_outgoing_request(req);
  http_hello_string_t s;
  wasi_http_types_method_outgoing_request_set_scheme(r, &scheme);
  http_hello_string_set(&s, authority);
  wasi_http_types_method_outgoing_request_set_authority(r, &s);
  http_hello_string_set(&s, path);
  wasi_http_types_method_outgoing_request_set_path_with_query(r, &s);

  wasi_http_types_own_future_incoming_response_t future;
  wasi_http_types_error_code_t code;
  if (!wasi_http_outgoing_handler_handle(req, NULL, &future, &code)) {
    respond_upstream_error(outparam, &code);
    wasi_http_types_error_code_free(&code);
    return;
  }
  wasi_http_types_borrow_future_incoming_response_t f =
      wasi_http_types_borrow_future_incoming_response(future);
  wasi_io_poll_own_pollable_t ready = wasi_http_types_method_future_incoming_response_subscribe(f);
  wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
  wasi_io_poll_pollable_drop_own(ready);
  wasi_http_types_result_result_own_incoming_response_error_code_void_t got;
  bool some = wasi_http_types_method_future_incoming_response_get(f, &got);
  wasi_http_types_future_incoming_response_drop_own(future);
  if (!some || got.is_err) {
    respond_text(outparam, 502, "internal-error\n");
    return;
  }
  if (got.val.ok.is_err) {
    respond_upstream_error(outparam, &got.val.ok.val.err);
    wasi_http_types_error_code_free(&got.val.ok.val.err);
    return;
  }
  wasi_http_types_own_incoming_response_t upstream = got.val.ok.val.ok;
  wasi_http_types_borrow_incoming_response_t u = wasi_http_types_borrow_incoming_response(upstream);

  response_t resp = respond(outparam, 200, "text/plain");
  char line[32];
  snprintf(line, sizeof line, "upstream %u\n", (unsigned)wasi_http_types_method_incoming_response_status(u));
  write_str(resp.stream, line);
  wasi_http_types_own_incoming_body_t body;
  if (wasi_http_types_method_incoming_response_consume(u, &body)) {
    istream_t in;
    if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &in)) {
      uint64_t copied;
      copy_stream(in, resp.stream, &copied);
      wasi_io_streams_input_stream_drop_own(in);
    }
    wasi_http_types_future_trailers_drop_own(wasi_http_types_static_incoming_body_finish(body));
  }
  wasi_http_types_incoming_response_drop_own(upstream);
  finish(resp, NULL);
}

// Opens `path` (absolute, below one of the preopened directories) for reading.
static bool open_file(const char *path, wasi_filesystem_types_own_descriptor_t *file) {
  wasi_filesystem_preopens_list_tuple2_own_descriptor_string_t dirs;
  wasi_filesystem_preopens_get_directories(&dirs);
  bool found = false;
  for (size_t i = 0; i < dirs.len; i++) {
    const http_hello_string_t *dir = &dirs.ptr[i].f1;
    size_t dl = dir->len;
    while (dl > 0 && dir->ptr[dl - 1] == '/') dl--; // "/" and "/data/" match like "" and "/data"
    const char *rel = NULL;
    if (dir->len == 1 && dir->ptr[0] == '.' && path[0] != '/')
      rel = path;
    else if (strncmp(path, (const char *)dir->ptr, dl) == 0 && path[dl] == '/')
      rel = path + dl + 1;
    if (!found && rel && *rel) {
      http_hello_string_t p;
      http_hello_string_set(&p, rel);
      wasi_filesystem_types_error_code_t err;
      found = wasi_filesystem_types_method_descriptor_open_at(
          wasi_filesystem_types_borrow_descriptor(dirs.ptr[i].f0),
          WASI_FILESYSTEM_TYPES_PATH_FLAGS_SYMLINK_FOLLOW, &p, 0,
          WASI_FILESYSTEM_TYPES_DESCRIPTOR_FLAGS_READ, file, &err);
    }
    wasi_filesystem_types_descriptor_drop_own(dirs.ptr[i].f0);
  }
  wasi_filesystem_preopens_list_tuple2_own_descriptor_string_free(&dirs);
  return found;
}

static void route_file(outparam_t outparam, const char *path) {
  wasi_filesystem_types_own_descriptor_t file;
  istream_t in;
  wasi_filesystem_types_error_code_t err;
  if (!open_file(path, &file)) {
    respond_text(outparam, 404, "cannot open\n");
    return;
  }
  if (!wasi_filesystem_types_method_descriptor_read_via_stream(
          wasi_filesystem_types_borrow_descriptor(file), 0, &in, &err)) {
    wasi_filesystem_types_descriptor_drop_own(file);
    respond_text(outparam, 404, "cannot read\n");
    return;
  }
  response_t resp = respond(outparam, 200, "application/octet-stream");
  uint64_t copied;
  copy_stream(in, resp.stream, &copied);
  wasi_io_streams_input_stream_drop_own(in);
  wasi_filesystem_types_descriptor_drop_own(file);
  finish(resp, NULL);
}

// ---- the export ------------------------------------------------------------------------------

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t outparam) {
  wasi_http_types_borrow_incoming_request_t req = wasi_http_types_borrow_incoming_request(request);

  // "/path?query" as a C string, split at the first '?'; the query percent-decoded.
  http_hello_string_t pq;
  char *target;
  if (wasi_http_types_method_incoming_request_path_with_query(req, &pq)) {
    target = malloc(pq.len + 1);
    memcpy(target, pq.ptr, pq.len);
    target[pq.len] = 0;
    http_hello_string_free(&pq);
  } else {
    target = strdup("/");
  }
  char *query = strchr(target, '?');
  if (query) {
    *query++ = 0;
    percent_decode(query);
  } else {
    query = target + strlen(target); // ""
  }
  const char *path = target;

  if (strcmp(path, "/env") == 0) route_env(outparam, query);
  else if (strcmp(path, "/echo") == 0) route_echo(req, outparam);
  else if (strcmp(path, "/grpc.health.v1.Health/Check") == 0) route_grpc_health(req, outparam);
  else if (strcmp(path, "/big") == 0) route_big(outparam, query);
  else if (strcmp(path, "/stderr") == 0) route_stderr(outparam, query);
  else if (strcmp(path, "/trap") == 0) __builtin_trap();
  else if (strcmp(path, "/hang") == 0) route_hang();
  else if (strcmp(path, "/hog") == 0) route_hog(outparam, query);
  else if (strcmp(path, "/fetch") == 0) route_fetch(outparam, query);
  else if (strcmp(path, "/file") == 0) route_file(outparam, query);
  else respond_text(outparam, 200, "Hello from a wasi:http component\n");

  free(target);
  wasi_http_types_incoming_request_drop_own(request);
}
