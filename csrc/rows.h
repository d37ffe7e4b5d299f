// Helpers shared by the CPU kernels of the row-wise losses (kl_ce.cpp, cosine.cpp):
// dispatch on the float dtypes we accept, and addressing of row r of an [N, D] or [B, S, D]
// tensor read in place through its strides.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace distil::cpu {

// Calls fn with a value of the C++ type of a (validated) float32 / bfloat16 / float16 dtype.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
    default:
      TORCH_CHECK(false, "distil: unexpected dtype ", dtype);
  }
}

// Calls fn(a_tag, b_tag) for two tensors' float dtypes (student and teacher may differ).
template <typename Fn>
void dispatch_pair(at::ScalarType a, at::ScalarType b, Fn&& fn) {
  dispatch_float(a, [&](auto a_tag) { dispatch_float(b, [&](auto b_tag) { fn(a_tag, b_tag); }); });
}

// Element offset of flat row r of a tensor whose leading 1 or 2 dims are the row dims
// (any strides, including the 0 strides of expanded views).
struct RowOffsets {
  int64_t inner;         // size of the last row dim
  int64_t outer_stride;  // stride of the first row dim when there are two, else 0
  int64_t inner_stride;
  int64_t operator()(int64_t r) const { return (r / inner) * outer_stride + (r % inner) * inner_stride; }
};

inline RowOffsets row_offsets(const at::Tensor& x, int64_t row_dims) {
  return {std::max<int64_t>(x.size(row_dims - 1), 1), row_dims == 2 ? x.stride(0) : 0, x.stride(row_dims - 1)};
}

// Whether the backward may rescale a gradient row the forward wrote by `factor` (the incoming
// gradient over the announced coefficient) instead of recomputing it. An fp32 row always: one more
// rounding. A 16-bit row only by a factor in [1/2, 2]: a farther one (a loss scale, 1/grad_accum)
// would carry the forward's rounding into the gradient, fp16's underflow of small entries included
// (zeros multiplied by 65536 stay zeros). kernels/ use the same rule.
inline bool rescale_keeps_precision(double factor, bool narrow) {
  const double f = std::abs(factor);
  return !narrow || (f >= 0.5 && f <= 2.0);
}

}  // namespace distil::cpu
