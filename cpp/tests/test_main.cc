// Runs every registered test; prints "N passed, N failed" for CI.
#include "test_util.h"

namespace geocell_test {
std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}
int failures = 0;
std::string source_dir = ".";
}  // namespace geocell_test

int main(int argc, char** argv) {
  using namespace geocell_test;
  if (argc > 1) source_dir = argv[1];
  int passed = 0, failed = 0;
  for (const auto& t : registry()) {
    const int before = failures;
    t.body();
    if (failures == before) {
      ++passed;
      std::printf("ok   %s\n", t.name);
    } else {
      ++failed;
      std::printf("FAIL %s\n", t.name);
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 && passed > 0 ? 0 : 1;
}
