// Helpers shared by the CPU kernels of the row-wise losses (kl_ce.cpp, cosine.cpp):
// dispatch on the float dtypes we accept, addressing of row r of an [N, D] or [B, S, D]
// tensor read in place through its strides, and the allocation of the gradient buffers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// An uninitialised contiguous tensor for a gradient that the kernel writes exactly once. It is
// fresh memory on every call (autograd hands it to .grad), and at ~2 GB/s of 4 KB first-touch page
// faults the faults cost more than the kernel's own pass: 12288 of them for a 16384 x 768 fp32
// buffer. From 2 MB on, the buffer is 2 MB-aligned and advised as transparent huge pages
// (MADV_HUGEPAGE, honoured in the kernel's default "madvise" THP mode), so it takes one fault per
// 2 MB instead; elsewhere (other OS, THP off) this is an ordinary allocation.
inline at::Tensor empty_written_once(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kHugePage) {
    const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, length);
    TORCH_CHECK(data != nullptr, "distil: out of memory allocating ", length, " bytes");
    madvise(data, length, MADV_HUGEPAGE);  // advice only: failure leaves 4 KB pages
    return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace distil::cpu
