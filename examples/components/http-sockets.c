// http-sockets: a wasi:http 0.2 HTTP handler (exports wasi:http/incoming-handler) whose routes
// use wasi:sockets from inside the guest (TCP connect and listen, UDP, name lookups), so that
// wasinode's tests see from the guest's side what a pod's allow-list lets through. Written
// against the C bindings wit-bindgen generates for the world `http-sockets` in
// wit/http-sockets.wit; built by tools/build-components; routes in examples/components/README.md.
//
// Every route answers 200 with what it did, or 502 with the name of the wasi:sockets
// error-code case that stopped it (for example `access-denied`), so a test can tell a refusal
// by the host from a failure of the network.

#include "http_sockets.h"
#define WORLD_LIST_U8 http_sockets_list_u8_t
#include "wasi-sockets.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef wasi_http_types_own_response_outparam_t outparam_t;

// ---- streams and responses ---------------------------------------------------------------------

static void respond_text(outparam_t outparam, uint16_t status, const char *text) {
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  wasi_http_types_field_name_t name;
  http_sockets_string_set(&name, "content-type");
  wasi_http_types_field_value_t value = {(uint8_t *)"text/plain", 10};
  wasi_http_types_header_error_t herr;
  wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &name, &value, &herr);

  wasi_http_types_own_outgoing_response_t resp = wasi_http_types_constructor_outgoing_response(headers);
  wasi_http_types_borrow_outgoing_response_t r = wasi_http_types_borrow_outgoing_response(resp);
  wasi_http_types_method_outgoing_response_set_status_code(r, status);
  wasi_http_types_own_outgoing_body_t body;
  wasi_http_types_method_outgoing_response_body(r, &body);
  wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
  result.val.ok = resp;
  wasi_http_types_static_response_outparam_set(outparam, &result);
  ostream_t stream;
  wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(body), &stream);
  write_all(stream, text, strlen(text));
  wasi_io_streams_output_stream_drop_own(stream);
  wasi_http_types_error_code_t err;
  if (!wasi_http_types_static_outgoing_body_finish(body, NULL, &err))
    wasi_http_types_error_code_free(&err);
}

// 502 with the error code's name and a newline.
static void respond_socket_error(outparam_t outparam, sock_err_t code) {
  char text[64];
  snprintf(text, sizeof text, "%s\n", socket_error_name(code));
  respond_text(outparam, 502, text);
}

// ---- addresses ---------------------------------------------------------------------------------

static wasi_sockets_network_ip_socket_address_t any_v4(uint16_t port) {
  wasi_sockets_network_ip_socket_address_t addr;
  addr.tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV4;
  addr.val.ipv4.port = port;
  addr.val.ipv4.address = (wasi_sockets_network_ipv4_address_t){0, 0, 0, 0};
  return addr;
}

// ---- routes ------------------------------------------------------------------------------------

// `/connect?IP:PORT`: a TCP connection (implicitly bound), then a line written on it.
static void route_connect(outparam_t outparam, const char *query) {
  wasi_sockets_network_ip_socket_address_t remote;
  if (!parse_v4(query, true, &remote)) {
    respond_text(outparam, 400, "usage: /connect?IP:PORT (IPv4)\n");
    return;
  }
  wasi_sockets_tcp_own_tcp_socket_t sock;
  wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t io;
  sock_err_t err;
  if (!tcp_connect(&remote, &sock, &io, &err)) {
    respond_socket_error(outparam, err);
    return;
  }
  const char line[] = "hello from a wasi:sockets guest\n";
  bool wrote = write_all(io.f1, line, sizeof line - 1);
  wasi_io_streams_output_stream_drop_own(io.f1);
  wasi_io_streams_input_stream_drop_own(io.f0);
  wasi_sockets_tcp_tcp_socket_drop_own(sock);
  respond_text(outparam, 200, wrote ? "connected\n" : "connected, write failed\n");
}

// `/listen?PORT`: bind 0.0.0.0:PORT (0: an ephemeral port), then listen (WASI 0.2 listens
// only on a bound socket).
static void route_listen(outparam_t outparam, const char *query) {
  char *end;
  unsigned long port = strtoul(query, &end, 10);
  if (*query == 0 || *end != 0 || port > 65535) {
    respond_text(outparam, 400, "usage: /listen?PORT\n");
    return;
  }
  wasi_sockets_tcp_own_tcp_socket_t sock;
  sock_err_t err;
  if (!wasi_sockets_tcp_create_socket_create_tcp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4,
                                                        &sock, &err)) {
    respond_socket_error(outparam, err);
    return;
  }
  wasi_sockets_network_own_network_t net = wasi_sockets_instance_network_instance_network();
  wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
  wasi_sockets_network_ip_socket_address_t local = any_v4((uint16_t)port);
  bool ok = wasi_sockets_tcp_method_tcp_socket_start_bind(s, wasi_sockets_network_borrow_network(net),
                                                          &local, &err);
  while (ok && !wasi_sockets_tcp_method_tcp_socket_finish_bind(s, &err)) {
    if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) ok = false;
    else block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
  }
  if (ok) ok = wasi_sockets_tcp_method_tcp_socket_start_listen(s, &err);
  while (ok && !wasi_sockets_tcp_method_tcp_socket_finish_listen(s, &err)) {
    if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) ok = false;
    else block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
  }
  if (ok) respond_text(outparam, 200, "listening\n");
  else respond_socket_error(outparam, err);
  wasi_sockets_tcp_tcp_socket_drop_own(sock);
  wasi_sockets_network_network_drop_own(net);
}

// `/udp?IP:PORT`: bind 0.0.0.0:0, then send one datagram to IP:PORT.
static void route_udp(outparam_t outparam, const char *query) {
  wasi_sockets_network_ip_socket_address_t remote;
  if (!parse_v4(query, true, &remote)) {
    respond_text(outparam, 400, "usage: /udp?IP:PORT (IPv4)\n");
    return;
  }
  wasi_sockets_udp_own_udp_socket_t sock;
  sock_err_t err;
  if (!wasi_sockets_udp_create_socket_create_udp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4,
                                                        &sock, &err)) {
    respond_socket_error(outparam, err);
    return;
  }
  wasi_sockets_network_own_network_t net = wasi_sockets_instance_network_instance_network();
  wasi_sockets_udp_borrow_udp_socket_t s = wasi_sockets_udp_borrow_udp_socket(sock);
  wasi_sockets_network_ip_socket_address_t local = any_v4(0);
  bool ok = wasi_sockets_udp_method_udp_socket_start_bind(s, wasi_sockets_network_borrow_network(net),
                                                          &local, &err);
  while (ok && !wasi_sockets_udp_method_udp_socket_finish_bind(s, &err)) {
    if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) ok = false;
    else block_on(wasi_sockets_udp_method_udp_socket_subscribe(s));
  }
  wasi_sockets_udp_tuple2_own_incoming_datagram_stream_own_outgoing_datagram_stream_t streams;
  bool have_streams = false;
  if (ok) {
    ok = have_streams = wasi_sockets_udp_method_udp_socket_stream(s, &remote, &streams, &err);
  }
  if (ok) {
    wasi_sockets_udp_borrow_outgoing_datagram_stream_t out =
        wasi_sockets_udp_borrow_outgoing_datagram_stream(streams.f1);
    uint64_t permit = 0;
    while (ok && permit == 0) {
      ok = wasi_sockets_udp_method_outgoing_datagram_stream_check_send(out, &permit, &err);
      if (ok && permit == 0) block_on(wasi_sockets_udp_method_outgoing_datagram_stream_subscribe(out));
    }
    if (ok) {
      wasi_sockets_udp_outgoing_datagram_t dgram = {
          .data = {(uint8_t *)"hello over udp\n", 15},
          .remote_address = {.is_some = false},
      };
      wasi_sockets_udp_list_outgoing_datagram_t list = {&dgram, 1};
      uint64_t sent = 0;
      ok = wasi_sockets_udp_method_outgoing_datagram_stream_send(out, &list, &sent, &err);
      if (ok && sent != 1) {
        ok = false;
        err = WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK;
      }
    }
  }
  if (ok) respond_text(outparam, 200, "sent\n");
  else respond_socket_error(outparam, err);
  if (have_streams) {
    wasi_sockets_udp_incoming_datagram_stream_drop_own(streams.f0);
    wasi_sockets_udp_outgoing_datagram_stream_drop_own(streams.f1);
  }
  wasi_sockets_udp_udp_socket_drop_own(sock);
  wasi_sockets_network_network_drop_own(net);
}

// `/lookup?NAME`: the addresses NAME resolves to, one a line (IPv4 dotted, IPv6 as "v6").
static void route_lookup(outparam_t outparam, const char *name) {
  wasi_sockets_network_own_network_t net = wasi_sockets_instance_network_instance_network();
  http_sockets_string_t n;
  http_sockets_string_set(&n, name);
  wasi_sockets_ip_name_lookup_own_resolve_address_stream_t stream;
  sock_err_t err;
  if (!wasi_sockets_ip_name_lookup_resolve_addresses(wasi_sockets_network_borrow_network(net), &n,
                                                     &stream, &err)) {
    respond_socket_error(outparam, err);
    wasi_sockets_network_network_drop_own(net);
    return;
  }
  wasi_sockets_ip_name_lookup_borrow_resolve_address_stream_t st =
      wasi_sockets_ip_name_lookup_borrow_resolve_address_stream(stream);
  char text[1024] = "";
  size_t used = 0;
  bool ok = true;
  for (;;) {
    wasi_sockets_ip_name_lookup_option_ip_address_t next;
    if (!wasi_sockets_ip_name_lookup_method_resolve_address_stream_resolve_next_address(st, &next, &err)) {
      if (err == WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
        block_on(wasi_sockets_ip_name_lookup_method_resolve_address_stream_subscribe(st));
        continue;
      }
      ok = false;
      break;
    }
    if (!next.is_some) break;
    if (used + 24 < sizeof text) {
      if (next.val.tag == WASI_SOCKETS_NETWORK_IP_ADDRESS_IPV4) {
        wasi_sockets_network_ipv4_address_t a = next.val.val.ipv4;
        used += (size_t)snprintf(text + used, sizeof text - used, "%u.%u.%u.%u\n", a.f0, a.f1, a.f2, a.f3);
      } else {
        used += (size_t)snprintf(text + used, sizeof text - used, "v6\n");
      }
    }
  }
  if (ok) respond_text(outparam, 200, text);
  else respond_socket_error(outparam, err);
  wasi_sockets_ip_name_lookup_resolve_address_stream_drop_own(stream);
  wasi_sockets_network_network_drop_own(net);
}

// ---- the export --------------------------------------------------------------------------------

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t outparam) {
  wasi_http_types_borrow_incoming_request_t req = wasi_http_types_borrow_incoming_request(request);
  http_sockets_string_t pq;
  char *target;
  if (wasi_http_types_method_incoming_request_path_with_query(req, &pq)) {
    target = malloc(pq.len + 1);
    memcpy(target, pq.ptr, pq.len);
    target[pq.len] = 0;
    http_sockets_string_free(&pq);
  } else {
    target = strdup("/");
  }
  char *query = strchr(target, '?');
  if (query) *query++ = 0;
  else query = target + strlen(target); // ""

  if (strcmp(target, "/connect") == 0) route_connect(outparam, query);
  else if (strcmp(target, "/listen") == 0) route_listen(outparam, query);
  else if (strcmp(target, "/udp") == 0) route_udp(outparam, query);
  else if (strcmp(target, "/lookup") == 0) route_lookup(outparam, query);
  else respond_text(outparam, 404, "routes: /connect?IP:PORT /listen?PORT /udp?IP:PORT /lookup?NAME\n");

  free(target);
  wasi_http_types_incoming_request_drop_own(request);
}
