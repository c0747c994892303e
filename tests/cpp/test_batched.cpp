// batched() of csrc/vector.cuh, the loop of the CUDA kernels that issues B loads before their
// uses: every index first, first + step, ... below end is loaded once and used once with its
// own item, in order, and a batch's loads all come before its uses.
// Plain C++ (no CUDA, no torch), run by CTest.
#include <cstdio>
#include <vector>

#include "vector.cuh"
#include "check.h"

template <int B>
static void check_visits(int first, int end, int step) {
  std::vector<int> events;  // +i + 1: load of i; -(i + 1): use of i
  cck::batched<B>(
      first, end, step,
      [&](int i) {
        events.push_back(i + 1);
        return i * 3;
      },
      [&](int i, int item) {
        events.push_back(-(i + 1));
        CHECK(item == i * 3);
      });
  std::vector<int> expected;
  for (int i0 = first; i0 < end; i0 += B * step) {
    for (int i = i0; i < i0 + B * step && i < end; i += step) expected.push_back(i + 1);
    for (int i = i0; i < i0 + B * step && i < end; i += step) expected.push_back(-(i + 1));
  }
  if (events != expected) {
    std::printf("B=%d first=%d end=%d step=%d: %zu events, expected %zu\n", B, first, end, step, events.size(),
                expected.size());
    ++failures;
  }
}

template <int B>
static void check_all() {
  for (int first = 0; first < 5; ++first) {
    for (int end = 0; end < 40; ++end) {
      for (int step = 1; step < 7; ++step) check_visits<B>(first, end, step);
    }
  }
}

int main() {
  check_all<1>();
  check_all<2>();
  check_all<4>();
  check_all<8>();
  // the visits themselves: rows 2, 5, 8, ... 23 in batches of 4 (the last batch ragged)
  std::vector<int> used;
  cck::batched<4>(2, 24, 3, [](int i) { return i; }, [&](int i, int) { used.push_back(i); });
  CHECK((used == std::vector<int>{2, 5, 8, 11, 14, 17, 20, 23}));
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
