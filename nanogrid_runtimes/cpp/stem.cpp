// The C++ runtime's stem-cell bootstrap: harness.cpp does the work (ready, load, compile in the sandbox, exec).
namespace nanogrid {
int bootstrap();
const char* (*bound_handler)(const char*) = nullptr;  // a stem cell has no function yet
}  // namespace nanogrid

int main() { return nanogrid::bootstrap(); }
