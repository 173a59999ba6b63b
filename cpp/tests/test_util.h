// A minimal test harness for the core's C++ tests (no dependencies, so the
// tests build anywhere the core builds, sanitizers included).
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace geocell_test {

struct TestCase {
  const char* name;
  std::function<void()> body;
};

std::vector<TestCase>& registry();
extern int failures;
extern std::string source_dir;  // repository root, from argv[1]

struct Register {
  Register(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

}  // namespace geocell_test

#define GC_CONCAT2(a, b) a##b
#define GC_CONCAT(a, b) GC_CONCAT2(a, b)
#define TEST(name)                                                                     \
  static void name();                                                                  \
  static ::geocell_test::Register GC_CONCAT(register_, name)(#name, name);             \
  static void name()

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);    \
      ++::geocell_test::failures;                                                      \
    }                                                                                  \
  } while (0)

#define CHECK_EQ(a, b)                                                                 \
  do {                                                                                 \
    const auto va = (a);                                                               \
    const auto vb = (b);                                                               \
    if (!(va == vb)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s != %s (%s vs %s)\n", __FILE__,  \
                   __LINE__, #a, #b, std::to_string(va).c_str(),                       \
                   std::to_string(vb).c_str());                                        \
      ++::geocell_test::failures;                                                      \
    }                                                                                  \
  } while (0)
