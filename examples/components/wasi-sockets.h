// wasi-sockets.h: what the two wasi:sockets test guests share (http-sockets.c, an HTTP handler,
// and command-hello.c, a command): the names of wasi:sockets/network.error-code's cases, IPv4
// address parsing, blocking on a pollable, writing a whole buffer to an output stream, and a
// blocking TCP connect. Include it after the world's bindings header (wit-bindgen's C
// bindings), with WORLD_LIST_U8 defined as that world's list<u8> type.
#ifndef WASINODE_WASI_SOCKETS_H
#define WASINODE_WASI_SOCKETS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

typedef wasi_sockets_network_error_code_t sock_err_t;
typedef wasi_io_streams_own_output_stream_t ostream_t;

// The names of wasi:sockets/network.error-code's cases, in the WIT's order.
static const char *const SOCKET_ERROR_NAMES[] = {
    "unknown", "access-denied", "not-supported", "invalid-argument", "out-of-memory",
    "timeout", "concurrency-conflict", "not-in-progress", "would-block", "invalid-state",
    "new-socket-limit", "address-not-bindable", "address-in-use", "remote-unreachable",
    "connection-refused", "connection-reset", "connection-aborted", "datagram-too-large",
    "name-unresolvable", "temporary-resolver-failure", "permanent-resolver-failure",
};

static const char *socket_error_name(sock_err_t code) {
  size_t n = sizeof SOCKET_ERROR_NAMES / sizeof SOCKET_ERROR_NAMES[0];
  return code < n ? SOCKET_ERROR_NAMES[code] : "unknown-error-code";
}

static void drop_stream_error(wasi_io_streams_stream_error_t *err) {
  if (err->tag == WASI_IO_STREAMS_STREAM_ERROR_LAST_OPERATION_FAILED)
    wasi_io_error_error_drop_own(err->val.last_operation_failed);
}

// Writes all of buf and flushes (blocking-write-and-flush takes at most 4096 bytes a call).
static bool write_all(ostream_t out, const void *buf, size_t len) {
  wasi_io_streams_borrow_output_stream_t o = wasi_io_streams_borrow_output_stream(out);
  const uint8_t *p = buf;
  while (len > 0) {
    size_t n = len < 4096 ? len : 4096;
    WORLD_LIST_U8 chunk = {(uint8_t *)p, n};
    wasi_io_streams_stream_error_t err;
    if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(o, &chunk, &err)) {
      drop_stream_error(&err);
      return false;
    }
    p += n;
    len -= n;
  }
  return true;
}

static void block_on(wasi_io_poll_own_pollable_t p) {
  wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(p));
  wasi_io_poll_pollable_drop_own(p);
}

// Parses "a.b.c.d:port" (or "a.b.c.d" with want_port false) into an IPv4 socket address.
static bool parse_v4(const char *s, bool want_port, wasi_sockets_network_ip_socket_address_t *out) {
  unsigned a, b, c, d, port = 0;
  char tail;
  int n = want_port ? sscanf(s, "%u.%u.%u.%u:%u%c", &a, &b, &c, &d, &port, &tail)
                    : sscanf(s, "%u.%u.%u.%u%c", &a, &b, &c, &d, &tail);
  if (n != (want_port ? 5 : 4) || a > 255 || b > 255 || c > 255 || d > 255 || port > 65535)
    return false;
  out->tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV4;
  out->val.ipv4.port = (uint16_t)port;
  out->val.ipv4.address = (wasi_sockets_network_ipv4_address_t){a, b, c, d};
  return true;
}

// A TCP connection to remote (implicitly bound), blocking until it is made or refused; on
// success *io holds its streams and the socket is in *sock (the caller drops all three).
static bool tcp_connect(wasi_sockets_network_ip_socket_address_t *remote,
                        wasi_sockets_tcp_own_tcp_socket_t *sock,
                        wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t *io,
                        sock_err_t *err) {
  if (!wasi_sockets_tcp_create_socket_create_tcp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4,
                                                        sock, err))
    return false;
  wasi_sockets_network_own_network_t net = wasi_sockets_instance_network_instance_network();
  wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(*sock);
  bool ok = wasi_sockets_tcp_method_tcp_socket_start_connect(
      s, wasi_sockets_network_borrow_network(net), remote, err);
  while (ok) {
    if (wasi_sockets_tcp_method_tcp_socket_finish_connect(s, io, err)) break;
    if (*err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
      ok = false;
      break;
    }
    block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
  }
  wasi_sockets_network_network_drop_own(net);
  if (!ok) wasi_sockets_tcp_tcp_socket_drop_own(*sock);
  return ok;
}

#endif
