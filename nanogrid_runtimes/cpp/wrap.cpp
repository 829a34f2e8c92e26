// Linked into every compiled function with -Wl,--wrap=main: the sandbox's protocol runs instead of the function's
// main (after every static initialiser of the function's own code), and its main runs only in program mode.
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace nanogrid {
int serve();
}

extern "C" int __real_main(int argc, char** argv) __attribute__((weak));  // the function's main, if it has one

extern "C" int __wrap_main(int argc, char** argv) {
  const char* stage = std::getenv("NANOGRID_STAGE");
  if (stage && std::strcmp(stage, "serve") == 0) return nanogrid::serve();
  unsetenv("NANOGRID_STAGE");
  if (!__real_main) {
    std::fprintf(stderr, "this function defines neither handler(const char* event) nor main()\n");
    return 2;
  }
  return __real_main(argc, argv);
}
