// Adaptive S2 partitioning of point sets (the GeoEstimation tau_min/tau_max rule).
//
// The rule, for one (tau_min, tau_max) pair: every point starts in its cell at
// level_min; cells holding <= tau_min points are dropped; while some cell holds
// more than tau_max points and the level is below level_max, every such cell is
// replaced by its non-empty children one level down; finally cells holding
// <= tau_min points are dropped again. Cells at level_max may hold more than
// tau_max points (stacks of identical locations).
//
// Implementation: the points' leaf ids are sorted once; then a cell's points are
// one contiguous range of the sorted array, found by binary search, and every
// partitioning is a descent of the quadtree over that one array.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace geocell {

struct PartitionParams {
  int64_t tau_min = 50;
  int64_t tau_max = 1000;
  int level_min = 2;
  int level_max = 30;
};

// One partitioning: cells ascending (Hilbert order), the position is the class.
struct PartitionCells {
  std::vector<uint64_t> cells;
  std::vector<int64_t> counts;
  std::vector<int8_t> levels;
  std::vector<double> centroids;  // lat, lng in degrees, interleaved (2 per cell)
  // [begin, end) of each cell's points in the sorted leaf array.
  std::vector<int64_t> begin, end;
};

// Sorts leaf cell ids ascending in place (parallel LSD radix sort; `scratch`
// must hold n values). threads = 0 uses every hardware thread.
void sort_cell_ids(uint64_t* ids, uint64_t* scratch, size_t n, int threads = 0);

// Partitions a sorted array of leaf ids once per parameter set (parameters
// are not validated here: 0 <= tau_min < tau_max, 0 <= level_min <= level_max
// <= 30). Centroids are the normalised mean of the member leaf-cell centres.
std::vector<PartitionCells> partition_sorted_leaves(const uint64_t* sorted_leaves, size_t n,
                                                    const PartitionParams* params,
                                                    size_t n_params, int threads = 0);

// The whole pipeline from coordinates in degrees. Points with invalid
// coordinates (latitude outside [-90, 90], longitude outside [-180, 180], or
// not finite) are skipped when drop_invalid is true, and their number stored
// in *n_dropped; otherwise nothing is computed and the index of the first
// invalid point is returned (-1 on success). Uses 16 bytes per point.
int64_t partition_latlng(const double* lat, const double* lng, size_t n,
                         const PartitionParams* params, size_t n_params, bool drop_invalid,
                         int threads, std::vector<PartitionCells>* out, int64_t* n_dropped);

// Whether a coordinate pair is accepted by the partitioner.
inline bool partition_point_valid(double lat, double lng) {
  return lat >= -90.0 && lat <= 90.0 && lng >= -180.0 && lng <= 180.0;  // false for NaN
}

// Index of the cell (sorted, disjoint) containing each point, -1 where none
// does or where the coordinates are invalid.
void assign_latlng(const uint64_t* cells, size_t n_cells, const double* lat, const double* lng,
                   size_t n, int64_t* out, int threads = 0);
// Same, for cell ids (any level): the index of the cell containing the whole
// of each query cell, -1 where none does.
void assign_cells(const uint64_t* cells, size_t n_cells, const uint64_t* queries, size_t n,
                  int64_t* out, int threads = 0);

}  // namespace geocell
