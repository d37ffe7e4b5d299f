// CUDA implementation of distil::masked_gather and distil::masked_scatter_rows
// (contracts in distil/_ops/masked_gather.py; schemas and the CPU twin in csrc/masked_gather.cpp).
//
// Gather: a CUB inclusive scan of the mask gives every selected row its output
// slot and the count (O(B*S) int64 temporaries); one kernel writes the index,
// one copies the rows with the widest vector (up to 16 bytes) that the
// alignment of x, its row strides and the row size allow.  Capacity mode never
// reads the count on the host; exact mode reads it once to size the output.
// Scatter: an inverse map (O(B*S)) lets one kernel write every output row once,
// either a gathered row or zeros, with no separate zero fill.
#include "../masked_gather.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_scan.cuh>
#include <cuda/std/functional>

namespace distil::gather {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// Writes index[slot] = i for selected i whose slot fits the capacity, and -1 in
// the slots past the count.  inclusive[i] = number of selected rows in [0, i].
__global__ void compact_index_kernel(const bool* __restrict__ flags, const int64_t* __restrict__ inclusive,
                                     int64_t n, int64_t out_rows, int64_t* __restrict__ index) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < n && flags[t]) {
    const int64_t slot = inclusive[t] - 1;
    if (slot < out_rows) index[slot] = t;
  }
  if (t < out_rows && t >= inclusive[n - 1]) index[t] = -1;
}

// inv[index[r]] = r; a repeated index keeps its last r, as on CPU.
__global__ void invert_index_kernel(const int64_t* __restrict__ index, int64_t n_index, int64_t n,
                                    int64_t* __restrict__ inv) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_index) return;
  const int64_t i = index[r];
  if (i < 0) return;
  CUDA_KERNEL_ASSERT(i < n && "masked_scatter_rows: index out of range");
  atomicMax(reinterpret_cast<long long*>(inv + i), static_cast<long long>(r));
}

// dst row r (contiguous, `units` words of V) = src row map[r] of `layout`, or zeros
// where map[r] < 0.  Layout strides and col_stride are in units of V.
template <typename V, bool kContiguousCols>
__global__ void __launch_bounds__(kThreads) copy_rows_kernel(V* __restrict__ dst, const V* __restrict__ src,
                                                             RowLayout layout, int64_t col_stride,
                                                             const int64_t* __restrict__ map, int64_t n_rows,
                                                             int64_t units) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= n_rows) return;
  V* out = dst + r * units;
  const int64_t from = map[r];
  const int step = blockDim.x;
  int64_t c = threadIdx.x;
  if (from < 0) {
    for (; c < units; c += step) out[c] = V{};
    return;
  }
  const V* in = src + layout.offset(from);
  auto load = [&](int64_t col) { return kContiguousCols ? in[col] : in[col * col_stride]; };
  // Several independent loads in flight per thread before the stores.
  for (; c + (kUnroll - 1) * step < units; c += kUnroll * step) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load(c + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) out[c + u * step] = v[u];
  }
  for (; c < units; c += step) out[c] = load(c);
}

template <typename V, bool kContiguousCols>
void launch_copy(void* dst, const void* src, RowLayout layout, int64_t col_stride, const int64_t* map,
                 int64_t n_rows, int64_t units, cudaStream_t stream) {
  // Long rows: a whole block per row, for many blocks to balance over the SMs.  Short
  // rows share a block (threadIdx.y picks the row), with the row width in threads that
  // leaves the fewest idle lanes (ties go to the wider one).
  int tx = kThreads;
  if (units < 4 * kThreads) {
    auto idle = [&](int64_t t) { return (units + t - 1) / t * t - units; };
    tx = 32;
    for (int t = 64; t <= kThreads; t *= 2) {
      if (idle(t) <= idle(tx)) tx = t;
    }
  }
  const dim3 block(tx, kThreads / tx);
  const int64_t blocks = (n_rows + block.y - 1) / block.y;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "masked_gather: too many rows for one launch");
  copy_rows_kernel<V, kContiguousCols><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<V*>(dst), static_cast<const V*>(src), layout, col_stride, map, n_rows, units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Copies n_rows rows of `cols` elements of size `elem_size` from src (layout and
// col_stride in elements) into contiguous dst, through map.
void copy_rows(void* dst, const void* src, RowLayout layout, int64_t col_stride, const int64_t* map,
               int64_t n_rows, int64_t cols, int64_t elem_size, cudaStream_t stream) {
  const int64_t row_bytes = cols * elem_size;
  if (n_rows == 0 || row_bytes == 0) return;
  if (col_stride != 1 && cols > 1) {
    switch (elem_size) {
      case 1: return launch_copy<uint8_t, false>(dst, src, layout, col_stride, map, n_rows, cols, stream);
      case 2: return launch_copy<uint16_t, false>(dst, src, layout, col_stride, map, n_rows, cols, stream);
      case 4: return launch_copy<uint32_t, false>(dst, src, layout, col_stride, map, n_rows, cols, stream);
      case 8: return launch_copy<uint64_t, false>(dst, src, layout, col_stride, map, n_rows, cols, stream);
      default: TORCH_CHECK_TYPE(false, "masked_gather: unsupported element size ", elem_size);
    }
  }
  // Widest word that divides the row size, both base addresses and every row stride.
  auto fits = [&](int64_t w) {
    if (row_bytes % w || reinterpret_cast<uintptr_t>(src) % w || reinterpret_cast<uintptr_t>(dst) % w) return false;
    for (int d = 0; d < layout.ndim; ++d) {
      if ((layout.strides[d] * elem_size) % w) return false;
    }
    return true;
  };
  int64_t w = 16;
  while (w > 1 && !fits(w)) w /= 2;
  for (int d = 0; d < layout.ndim; ++d) layout.strides[d] = layout.strides[d] * elem_size / w;
  const int64_t units = row_bytes / w;
  switch (w) {
    case 16: return launch_copy<uint4, true>(dst, src, layout, 1, map, n_rows, units, stream);
    case 8: return launch_copy<uint2, true>(dst, src, layout, 1, map, n_rows, units, stream);
    case 4: return launch_copy<uint32_t, true>(dst, src, layout, 1, map, n_rows, units, stream);
    case 2: return launch_copy<uint16_t, true>(dst, src, layout, 1, map, n_rows, units, stream);
    default: return launch_copy<uint8_t, true>(dst, src, layout, 1, map, n_rows, units, stream);
  }
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_gather_cuda(const at::Tensor& x, const at::Tensor& mask,
                                                                   std::optional<c10::SymInt> capacity) {
  check_gather_args(x, mask);
  const int64_t k = checked_capacity(capacity);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto long_opts = x.options().dtype(at::kLong);
  const at::Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  const int64_t cols = x.size(-1);

  if (n == 0) {
    const int64_t out_rows = k < 0 ? 0 : k;
    return {at::zeros({out_rows, cols}, x.options()), at::full({out_rows}, -1, long_opts), at::zeros({}, long_opts)};
  }

  at::Tensor inclusive = at::empty({n}, long_opts);
  const bool* flags = m.const_data_ptr<bool>();
  int64_t* incl = inclusive.mutable_data_ptr<int64_t>();
  // The int64 initial value makes CUB accumulate in int64 (a bool input alone would give int).
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveScanInit(nullptr, temp_bytes, flags, incl, ::cuda::std::plus<>{},
                                                    int64_t{0}, n, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveScanInit(temp.mutable_data_ptr(), temp_bytes, flags, incl,
                                                    ::cuda::std::plus<>{}, int64_t{0}, n, stream));
  at::Tensor count = inclusive.select(0, n - 1).clone();
  // Exact mode: the one device->host sync, to size the output.
  const int64_t out_rows = k < 0 ? count.item<int64_t>() : k;

  at::Tensor index = at::empty({out_rows}, long_opts);
  const int64_t threads = std::max(n, out_rows);
  compact_index_kernel<<<static_cast<unsigned>(blocks_for(threads)), kThreads, 0, stream>>>(
      flags, incl, n, out_rows, index.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor rows = at::empty({out_rows, cols}, x.options());
  copy_rows(rows.mutable_data_ptr(), x.const_data_ptr(), row_layout(x), x.stride(-1), index.const_data_ptr<int64_t>(),
            out_rows, cols, x.element_size(), stream);
  return {rows, index, count};
}

at::Tensor masked_scatter_rows_cuda(const at::Tensor& rows, const at::Tensor& index, c10::SymIntArrayRef shape) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(shape);
  const int64_t n = check_scatter_args(rows, index, sizes);
  const c10::cuda::CUDAGuard guard(rows.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = index.contiguous();
  at::Tensor inv = at::full({n}, -1, idx.options());
  if (idx.numel() > 0) {
    invert_index_kernel<<<static_cast<unsigned>(blocks_for(idx.numel())), kThreads, 0, stream>>>(
        idx.const_data_ptr<int64_t>(), idx.numel(), n, inv.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor out = at::empty(sizes, rows.options());
  copy_rows(out.mutable_data_ptr(), rows.const_data_ptr(), row_layout(rows), rows.stride(1),
            inv.const_data_ptr<int64_t>(), n, rows.size(1), rows.element_size(), stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distil, CUDA, m) {
  m.impl("masked_gather", &masked_gather_cuda);
  m.impl("masked_scatter_rows", &masked_scatter_rows_cuda);
}

}  // namespace distil::gather
