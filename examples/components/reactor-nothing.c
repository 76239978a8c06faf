// reactor-nothing: a component that exports only wasinode:test/nothing (wit/reactor-nothing.wit):
// neither an HTTP handler nor a command. wasinode's tests use it to check the refusal message.
#include "reactor_nothing.h"

uint32_t exports_wasinode_test_nothing_answer(void) { return 42; }
