// CHECK(cond) for the host-side C++ tests: prints a failed condition and counts it in
// `failures`; a test's main returns nonzero when any failed.
#pragma once

#include <cstdio>

static int failures = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::printf("%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                          \
    }                                                                      \
  } while (0)
