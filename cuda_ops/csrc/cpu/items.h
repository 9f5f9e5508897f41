// Host-side item bookkeeping shared by the CPU grouped kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace petops {

// Items grouped by segment, in item order within a segment. Groups own disjoint token rows,
// so the CPU kernels run groups in parallel and a group's items sequentially; that keeps
// the reference's "sum every item's contribution" semantics even for overlapping columns.
struct SegmentGroups {
  std::vector<int32_t> seg;    // segment of group g
  std::vector<int64_t> begin;  // items of group g: order[begin[g] .. begin[g + 1])
  std::vector<int64_t> order;
};

inline SegmentGroups group_by_segment(const at::Tensor& item_seg, int64_t num_segments) {
  const int32_t* is = item_seg.data_ptr<int32_t>();
  const int64_t n = item_seg.numel();
  std::vector<int64_t> count(num_segments + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++count[is[i] + 1];
  for (int64_t s = 0; s < num_segments; ++s) count[s + 1] += count[s];
  SegmentGroups g;
  g.order.resize(n);
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < n; ++i) g.order[fill[is[i]]++] = i;
  for (int64_t s = 0; s < num_segments; ++s) {
    if (count[s + 1] == count[s]) continue;
    g.seg.push_back(static_cast<int32_t>(s));
    g.begin.push_back(count[s]);
  }
  g.begin.push_back(n);
  return g;
}

}  // namespace petops
