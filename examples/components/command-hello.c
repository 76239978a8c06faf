// command-hello: a wasi:cli command component (exports wasi:cli/run) for wasinode's tests.
// A plain C program on wasi-libc; tools/build-components links it as a preview-1 command and
// turns it into a component with the preview-1 command adapter, as C, Rust and Go users do.
// It also imports wasi:cli/exit@0.2.12 itself (world command-hello in wit/command-hello.wit,
// wit-bindgen's C bindings), for `exit-with-code`, and wasi:sockets for `--connect`.
//
//   command-hello [ARG]... [--read PATH] [--connect IP:PORT] [--exit N] [--exit-with-code N]
// prints "arg I: ARG" for each argument, "env GREETING=VALUE" if GREETING is set, "to stderr"
// on stderr, the contents of PATH for --read PATH; for --connect, makes a TCP connection with
// wasi:sockets (the guest's own, not through the adapter), writes a line on it and prints
// "connect IP:PORT: connected", or the wasi:sockets error-code that refused it (for example
// "connect IP:PORT: access-denied"); and exits with N (default 0): for --exit
// by returning N from main (wasi-libc's exit, then the adapter's proc_exit, which can only say
// success or failure: wasi:cli/exit.exit(err) for any N other than 0), for --exit-with-code by
// calling wasi:cli/exit.exit-with-code(N) (N from 0 to 255), which reports N itself.
#include "command_hello.h"
#define WORLD_LIST_U8 command_hello_list_u8_t
#include "wasi-sockets.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cat(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    return 1;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
  fclose(f);
  return 0;
}

static int connect_to(const char *target) {
  wasi_sockets_network_ip_socket_address_t remote;
  if (!parse_v4(target, true, &remote)) {
    printf("connect %s: not an IPv4 address and port\n", target);
    return 1;
  }
  wasi_sockets_tcp_own_tcp_socket_t sock;
  wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t io;
  sock_err_t err;
  if (!tcp_connect(&remote, &sock, &io, &err)) {
    printf("connect %s: %s\n", target, socket_error_name(err));
    return 1;
  }
  const char line[] = "hello from a wasi:sockets command\n";
  bool wrote = write_all(io.f1, line, sizeof line - 1);
  wasi_io_streams_output_stream_drop_own(io.f1);
  wasi_io_streams_input_stream_drop_own(io.f0);
  wasi_sockets_tcp_tcp_socket_drop_own(sock);
  printf("connect %s: %s\n", target, wrote ? "connected" : "connected, write failed");
  return wrote ? 0 : 1;
}

int main(int argc, char **argv) {
  int code = 0;
  int with_code = -1;
  for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);

  const char *greeting = getenv("GREETING");
  if (greeting) printf("env GREETING=%s\n", greeting);
  fprintf(stderr, "to stderr\n");

  for (int i = 1; i + 1 < argc; i++) {
    if (strcmp(argv[i], "--read") == 0 && cat(argv[i + 1]) != 0) code = 1;
    if (strcmp(argv[i], "--connect") == 0 && connect_to(argv[i + 1]) != 0) code = 1;
    if (strcmp(argv[i], "--exit") == 0) code = atoi(argv[i + 1]);
    if (strcmp(argv[i], "--exit-with-code") == 0) with_code = atoi(argv[i + 1]);
  }
  fflush(stdout);
  if (with_code >= 0 && with_code <= 255) wasi_cli_exit_exit_with_code((uint8_t)with_code);
  return code;
}
