// command-hello: a wasi:cli command component (exports wasi:cli/run) for wasinode's tests.
// A plain C program on wasi-libc; tools/build-components links it as a preview-1 command and
// turns it into a component with the preview-1 command adapter, as C, Rust and Go users do.
// It also imports wasi:cli/exit@0.2.12 itself (world command-hello in wit/command-hello.wit,
// wit-bindgen's C bindings), for `exit-with-code`.
//
//   command-hello [ARG]... [--read PATH] [--exit N] [--exit-with-code N]
// prints "arg I: ARG" for each argument, "env GREETING=VALUE" if GREETING is set, "to stderr"
// on stderr, the contents of PATH for --read PATH, and exits with N (default 0): for --exit
// by returning N from main (wasi-libc's exit, then the adapter's proc_exit, which can only say
// success or failure: wasi:cli/exit.exit(err) for any N other than 0), for --exit-with-code by
// calling wasi:cli/exit.exit-with-code(N) (N from 0 to 255), which reports N itself.
#include "command_hello.h"

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

int main(int argc, char **argv) {
  int code = 0;
  int with_code = -1;
  for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);

  const char *greeting = getenv("GREETING");
  if (greeting) printf("env GREETING=%s\n", greeting);
  fprintf(stderr, "to stderr\n");

  for (int i = 1; i + 1 < argc; i++) {
    if (strcmp(argv[i], "--read") == 0 && cat(argv[i + 1]) != 0) code = 1;
    if (strcmp(argv[i], "--exit") == 0) code = atoi(argv[i + 1]);
    if (strcmp(argv[i], "--exit-with-code") == 0) with_code = atoi(argv[i + 1]);
  }
  fflush(stdout);
  if (with_code >= 0 && with_code <= 255) wasi_cli_exit_exit_with_code((uint8_t)with_code);
  return code;
}
