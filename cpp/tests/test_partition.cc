// Tests of the partitioner core: the literal GeoEstimation rule, brute force,
// against the sorted-array descent.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include "geocell/partition.h"
#include "geocell/s2.h"
#include "test_util.h"

using namespace geocell;

namespace {

struct RefCell {
  uint64_t cell;
  int64_t count;
};

// The rule as stated: per-point labels, recounted after every step.
std::vector<RefCell> reference_partition(const std::vector<uint64_t>& leaves,
                                         const PartitionParams& p) {
  std::vector<uint64_t> label(leaves.size());
  std::vector<bool> alive(leaves.size(), true);
  for (size_t k = 0; k < leaves.size(); ++k) label[k] = cell_to_parent(leaves[k], p.level_min);
  auto counts = [&] {
    std::map<uint64_t, int64_t> c;
    for (size_t k = 0; k < leaves.size(); ++k)
      if (alive[k]) ++c[label[k]];
    return c;
  };
  auto drop_small = [&] {
    auto c = counts();
    for (size_t k = 0; k < leaves.size(); ++k)
      if (alive[k] && c[label[k]] <= p.tau_min) alive[k] = false;
  };
  drop_small();
  int level = p.level_min;
  for (;;) {
    auto c = counts();
    bool any_big = false;
    for (auto& kv : c) any_big |= kv.second > p.tau_max;
    if (!any_big || level >= p.level_max) break;
    ++level;
    for (size_t k = 0; k < leaves.size(); ++k)
      if (alive[k] && c[label[k]] > p.tau_max) label[k] = cell_to_parent(leaves[k], level);
  }
  drop_small();
  std::vector<RefCell> out;
  for (auto& kv : counts()) out.push_back({kv.first, kv.second});
  return out;
}

std::vector<uint64_t> random_leaves(std::mt19937_64& rng, size_t n) {
  // Clustered around a few centres, with exact duplicates, so cells split deep.
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<uint64_t> out;
  double centre_lat = 0, centre_lng = 0, spread = 1;
  for (size_t k = 0; k < n; ++k) {
    if (k % 37 == 0) {
      centre_lat = 89 * u(rng);
      centre_lng = 180 * u(rng);
      spread = std::pow(10.0, -6 * std::abs(u(rng)));
    }
    if (!out.empty() && u(rng) > 0.8) {
      out.push_back(out.back());
      continue;
    }
    const double lat = std::max(-90.0, std::min(90.0, centre_lat + spread * u(rng)));
    out.push_back(latlng_to_cell(lat, centre_lng + spread * u(rng)));
  }
  return out;
}

}  // namespace

TEST(partition_matches_literal_rule) {
  std::mt19937_64 rng(7);
  const PartitionParams cases[] = {{0, 1, 0, 30}, {2, 10, 2, 30}, {5, 20, 3, 12},
                                   {1, 4, 30, 30}, {10, 30, 0, 0}, {3, 8, 5, 9}};
  for (size_t n : {0, 1, 5, 200, 3000}) {
    std::vector<uint64_t> leaves = random_leaves(rng, n);
    std::vector<uint64_t> sorted = leaves, scratch(n);
    sort_cell_ids(sorted.data(), scratch.data(), n, 2);
    CHECK(std::is_sorted(sorted.begin(), sorted.end()));
    const auto parts = partition_sorted_leaves(sorted.data(), n, cases, 6, 2);
    CHECK_EQ(parts.size(), size_t{6});
    for (size_t c = 0; c < 6; ++c) {
      const auto ref = reference_partition(leaves, cases[c]);
      CHECK_EQ(parts[c].cells.size(), ref.size());
      if (parts[c].cells.size() != ref.size()) continue;
      for (size_t k = 0; k < ref.size(); ++k) {
        CHECK_EQ(parts[c].cells[k], ref[k].cell);
        CHECK_EQ(parts[c].counts[k], ref[k].count);
        CHECK_EQ(static_cast<int>(parts[c].levels[k]), cell_level(ref[k].cell));
      }
    }
  }
}

TEST(partition_radix_sort_large) {
  std::mt19937_64 rng(11);
  std::vector<uint64_t> ids = random_leaves(rng, 300000), scratch(ids.size());
  std::vector<uint64_t> expect = ids;
  std::sort(expect.begin(), expect.end());
  sort_cell_ids(ids.data(), scratch.data(), ids.size(), 2);
  CHECK(ids == expect);
  // A stack of identical ids larger than any in-cache bucket, plus near neighbours.
  std::vector<uint64_t> stack(100000, latlng_to_cell(48.8584, 2.2945));
  for (int k = 0; k < 50000; ++k) stack.push_back(stack[0] + 2 * (rng() % 1000) - 1000);
  std::shuffle(stack.begin(), stack.end(), rng);
  expect = stack;
  std::sort(expect.begin(), expect.end());
  scratch.resize(stack.size());
  sort_cell_ids(stack.data(), scratch.data(), stack.size(), 2);
  CHECK(stack == expect);
}

TEST(partition_latlng_centroids_and_assign) {
  // Points straddling the antimeridian: the centroid must sit on it, not at 0.
  std::vector<double> lat, lng;
  for (int k = 0; k < 100; ++k) {
    lat.push_back(10.0 + 0.001 * k);
    lng.push_back(k % 2 ? 179.9995 : -179.9995);
  }
  lat.push_back(NAN);
  lng.push_back(0.0);
  const PartitionParams p{10, 1000, 2, 30};
  std::vector<PartitionCells> parts;
  int64_t dropped = 0;
  CHECK_EQ(partition_latlng(lat.data(), lng.data(), lat.size(), &p, 1, false, 2, &parts, &dropped),
           int64_t{100});
  CHECK_EQ(partition_latlng(lat.data(), lng.data(), lat.size(), &p, 1, true, 2, &parts, &dropped),
           int64_t{-1});
  CHECK_EQ(dropped, int64_t{1});
  int64_t total = 0;
  for (size_t c = 0; c < parts[0].cells.size(); ++c) {
    total += parts[0].counts[c];
    CHECK(std::abs(std::abs(parts[0].centroids[2 * c + 1]) - 180.0) < 0.001);
  }
  CHECK_EQ(total, int64_t{100});
  std::vector<int64_t> idx(lat.size());
  assign_latlng(parts[0].cells.data(), parts[0].cells.size(), lat.data(), lng.data(), lat.size(),
                idx.data(), 2);
  CHECK_EQ(idx.back(), int64_t{-1});
  for (size_t k = 0; k + 1 < lat.size(); ++k) {
    CHECK(idx[k] >= 0);
    if (idx[k] >= 0) CHECK(cell_contains(parts[0].cells[idx[k]], latlng_to_cell(lat[k], lng[k])));
  }
  std::vector<int64_t> self(parts[0].cells.size());
  assign_cells(parts[0].cells.data(), parts[0].cells.size(), parts[0].cells.data(),
               parts[0].cells.size(), self.data(), 1);
  for (size_t c = 0; c < self.size(); ++c) CHECK_EQ(self[c], static_cast<int64_t>(c));
}
