// Shared by the CPU (masked_gather.cpp) and CUDA (cuda/masked_gather.cu)
// implementations of distil::masked_gather and distil::masked_scatter_rows:
// argument checks and the description of x's row layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace distil::gather {

// Most row (leading) dims x may keep after adjacent dims are merged.
constexpr int kMaxRowDims = 8;

// The row dims of x ([..., H]) as sizes and strides, merged where one dim
// steps evenly into the next, so that row i (flat, row-major over the mask)
// starts `offset(i)` elements after x's data pointer.  Strided x is read in
// place: no [B, S, H] temporary is ever made.
struct RowLayout {
  int ndim = 0;
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};

  C10_HOST_DEVICE int64_t offset(int64_t i) const {
    int64_t off = 0;
    for (int d = ndim - 1; d > 0; --d) {
      off += (i % sizes[d]) * strides[d];
      i /= sizes[d];
    }
    return off + i * strides[0];
  }
};

inline RowLayout row_layout(const at::Tensor& x) {
  RowLayout layout;
  const int64_t row_dims = x.dim() - 1;
  for (int64_t d = 0; d < row_dims; ++d) {
    const int64_t size = x.size(d), stride = x.stride(d);
    if (size == 1) continue;  // a size-1 dim's stride is meaningless
    if (layout.ndim > 0 && layout.strides[layout.ndim - 1] == stride * size) {
      layout.sizes[layout.ndim - 1] *= size;
      layout.strides[layout.ndim - 1] = stride;
      continue;
    }
    TORCH_CHECK_VALUE(layout.ndim < kMaxRowDims, "masked_gather: x has more than ", kMaxRowDims,
                      " leading dims that cannot be merged; make it contiguous first");
    layout.sizes[layout.ndim] = size;
    layout.strides[layout.ndim] = stride;
    ++layout.ndim;
  }
  if (layout.ndim == 0) {  // zero or one row
    layout.ndim = 1;
    layout.sizes[0] = 1;
  }
  return layout;
}

inline int64_t checked_capacity(const std::optional<c10::SymInt>& capacity) {
  if (!capacity.has_value()) return -1;
  const int64_t k = capacity->expect_int();
  TORCH_CHECK_VALUE(k >= 0, "masked_gather: capacity must be >= 0, got ", k);
  return k;
}

inline void check_gather_args(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "masked_gather: x must be [..., H] with at least 2 dims, got shape ",
                    x.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "masked_gather: mask must be torch.bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == x.sizes().slice(0, x.dim() - 1), "masked_gather: mask shape ",
                    mask.sizes(), " must equal x's leading dims ", x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK_VALUE(mask.device() == x.device(), "masked_gather: mask is on ", mask.device(),
                    " but x is on ", x.device());
}

// Returns the number of rows of the output (prod(shape[:-1])).
inline int64_t check_scatter_args(const at::Tensor& rows, const at::Tensor& index, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(rows.dim() == 2, "masked_scatter_rows: rows must be 2-D [R, H], got shape ", rows.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "masked_scatter_rows: index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == rows.size(0), "masked_scatter_rows: index must be [",
                    rows.size(0), "], got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == rows.device(), "masked_scatter_rows: index is on ", index.device(),
                    " but rows is on ", rows.device());
  TORCH_CHECK_VALUE(shape.size() >= 2 && shape.back() == rows.size(1), "masked_scatter_rows: shape ", shape,
                    " must be [..., ", rows.size(1), "]");
  int64_t n = 1;
  for (size_t d = 0; d + 1 < shape.size(); ++d) {
    TORCH_CHECK_VALUE(shape[d] >= 0, "masked_scatter_rows: negative size in shape ", shape);
    n *= shape[d];
  }
  return n;
}

}  // namespace distil::gather
