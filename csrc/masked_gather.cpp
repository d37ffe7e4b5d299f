// distil::masked_gather and distil::masked_scatter_rows: schemas and CPU kernels
// (contracts in distil/_ops/masked_gather.py; CUDA twin in cuda/masked_gather.cu).  Rows are copied as raw bytes, so every dtype
// is bit-exact and the CUDA implementation must match it bit for bit.
#include "masked_gather.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace distil::gather {
namespace {

template <typename T>
void copy_strided_row(char* dst, const char* src, int64_t cols, int64_t col_stride) {
  auto* d = reinterpret_cast<T*>(dst);
  const auto* s = reinterpret_cast<const T*>(src);
  for (int64_t c = 0; c < cols; ++c) d[c] = s[c * col_stride];
}

// dst[r] = src row map[r] (a flat row number of `layout`) or zeros where map[r] < 0,
// for the `n_rows` contiguous rows of `cols` elements of dst.
void copy_rows(char* dst, const char* src, const RowLayout& layout, int64_t col_stride, const int64_t* map,
               int64_t n_rows, int64_t cols, int64_t elem_size) {
  const int64_t row_bytes = cols * elem_size;
  if (row_bytes == 0) return;
  const bool contiguous_cols = col_stride == 1 || cols == 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_bytes);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      char* out = dst + r * row_bytes;
      if (map[r] < 0) {
        std::memset(out, 0, row_bytes);
        continue;
      }
      const char* in = src + layout.offset(map[r]) * elem_size;
      if (contiguous_cols) {
        std::memcpy(out, in, row_bytes);
        continue;
      }
      switch (elem_size) {
        case 1: copy_strided_row<uint8_t>(out, in, cols, col_stride); break;
        case 2: copy_strided_row<uint16_t>(out, in, cols, col_stride); break;
        case 4: copy_strided_row<uint32_t>(out, in, cols, col_stride); break;
        case 8: copy_strided_row<uint64_t>(out, in, cols, col_stride); break;
        default: TORCH_CHECK_TYPE(false, "masked_gather: unsupported element size ", elem_size);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_gather_cpu(const at::Tensor& x, const at::Tensor& mask,
                                                                  std::optional<c10::SymInt> capacity) {
  check_gather_args(x, mask);
  const int64_t k = checked_capacity(capacity);
  const at::Tensor m = mask.contiguous();
  const bool* flags = m.const_data_ptr<bool>();
  const int64_t n = m.numel();

  // Two-pass parallel compaction: count per chunk, scan the chunk counts, fill.
  constexpr int64_t kChunk = 1 << 14;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> starts(n_chunks + 1, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t count = 0;
      for (int64_t i = c * kChunk, stop = std::min(n, i + kChunk); i < stop; ++i) count += flags[i];
      starts[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c) starts[c + 1] += starts[c];
  const int64_t total = starts[n_chunks];
  const int64_t out_rows = k < 0 ? total : k;

  at::Tensor index = at::empty({out_rows}, x.options().dtype(at::kLong));
  int64_t* idx = index.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t pos = starts[c];
      for (int64_t i = c * kChunk, stop = std::min(n, i + kChunk); i < stop && pos < out_rows; ++i) {
        if (flags[i]) idx[pos++] = i;
      }
    }
  });
  for (int64_t r = total; r < out_rows; ++r) idx[r] = -1;

  const int64_t cols = x.size(-1);
  at::Tensor rows = at::empty({out_rows, cols}, x.options());
  copy_rows(static_cast<char*>(rows.mutable_data_ptr()), static_cast<const char*>(x.const_data_ptr()),
            row_layout(x), x.stride(-1), idx, out_rows, cols, x.element_size());
  return {rows, index, at::scalar_tensor(total, x.options().dtype(at::kLong))};
}

at::Tensor masked_scatter_rows_cpu(const at::Tensor& rows, const at::Tensor& index, c10::SymIntArrayRef shape) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(shape);
  const int64_t n = check_scatter_args(rows, index, sizes);
  const at::Tensor idx_t = index.contiguous();
  const int64_t* idx = idx_t.const_data_ptr<int64_t>();

  // Inverse map: out row i takes rows[inv[i]].  A repeated index keeps its last row
  // (the CUDA implementation does the same with atomicMax).
  at::Tensor inv = at::full({n}, -1, index.options());
  int64_t* inv_p = inv.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < index.numel(); ++r) {
    if (idx[r] < 0) continue;
    TORCH_CHECK_VALUE(idx[r] < n, "masked_scatter_rows: index ", idx[r], " out of range for ", n, " rows");
    inv_p[idx[r]] = r;
  }

  at::Tensor out = at::empty(sizes, rows.options());
  copy_rows(static_cast<char*>(out.mutable_data_ptr()), static_cast<const char*>(rows.const_data_ptr()),
            row_layout(rows), rows.stride(1), inv_p, n, rows.size(1), rows.element_size());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distil, m) {
  m.def("masked_gather(Tensor x, Tensor mask, SymInt? capacity) -> (Tensor rows, Tensor index, Tensor count)");
  m.def("masked_scatter_rows(Tensor rows, Tensor index, SymInt[] shape) -> Tensor");
}

TORCH_LIBRARY_IMPL(distil, CPU, m) {
  m.impl("masked_gather", &masked_gather_cpu);
  m.impl("masked_scatter_rows", &masked_scatter_rows_cpu);
}

}  // namespace distil::gather
