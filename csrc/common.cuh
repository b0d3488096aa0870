// Shared helpers of the fastmtl CUDA kernels (csrc/*.cu): input checks, column loads with an
// optional vectorised path, launch constants. Header-only; included by the .cu files only.
#pragma once

// Only c10/cuda and cudart: not ATen/cuda/CUDAContext.h, which pulls in the cuBLAS, cuSPARSE
// and cuSOLVER headers that a minimal CUDA toolkit (nvcc + cudart) does not have.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmtl {

constexpr int kWarpSize = 32;

// VEC consecutive elements of T, aligned to their total size, so that one access is one
// vector load/store (16 bytes for 4 x fp32 or 2 x fp64, 8 bytes for 4 x fp16/bf16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

// vals[v] = row[c + v] for c + v < end, else 0, converted to acc_t. Vector load when
// VECTORIZED (the caller guarantees row + c is aligned to sizeof(scalar_t) * VEC) and the VEC
// columns are all in range; else scalar loads. Both paths give the same values, so results
// do not depend on alignment.
template <typename scalar_t, typename acc_t, int VEC, bool VECTORIZED>
__device__ __forceinline__ void load_cols(const scalar_t* row, int64_t c, int64_t end,
                                          acc_t (&vals)[VEC]) {
  if (VECTORIZED && c + VEC <= end) {
    const Packed<scalar_t, VEC> p = *reinterpret_cast<const Packed<scalar_t, VEC>*>(row + c);
#pragma unroll
    for (int v = 0; v < VEC; ++v) vals[v] = static_cast<acc_t>(p.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      vals[v] = (c + v < end) ? static_cast<acc_t>(row[c + v]) : acc_t(0);
  }
}

// row[c + v] = vals[v] for c + v < end (same vector/scalar rule as load_cols).
template <typename out_t, typename acc_t, int VEC, bool VECTORIZED>
__device__ __forceinline__ void store_cols(out_t* row, int64_t c, int64_t end,
                                           const acc_t (&vals)[VEC]) {
  if (VECTORIZED && c + VEC <= end) {
    Packed<out_t, VEC> p;
#pragma unroll
    for (int v = 0; v < VEC; ++v) p.v[v] = static_cast<out_t>(vals[v]);
    *reinterpret_cast<Packed<out_t, VEC>*>(row + c) = p;
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      if (c + v < end) row[c + v] = static_cast<out_t>(vals[v]);
  }
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype of the ops: float64 for float64 inputs, float32 for everything else.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by the ops on the (T, N) gradient matrix G.
inline void check_matrix(const at::Tensor& G, const char* op) {
  TORCH_CHECK(G.is_cuda(), op, ": G must be a CUDA tensor, got device ", G.device());
  TORCH_CHECK(G.dim() == 2, op, ": G must be 2-D of shape (T, N), got shape ", G.sizes());
  TORCH_CHECK(G.size(0) >= 1 && G.size(1) >= 1, op,
              ": G must have T >= 1 rows and N >= 1 columns, got shape ", G.sizes());
  TORCH_CHECK(is_kernel_dtype(G.scalar_type()), op,
              ": G must be float16, bfloat16, float32 or float64, got ", G.scalar_type());
  TORCH_CHECK(G.stride(1) == 1 || G.size(1) == 1, op,
              ": G must have unit stride along N (dim 1), got strides ", G.strides());
  TORCH_CHECK(G.size(0) <= INT32_MAX, op, ": T = ", G.size(0), " rows is too many");
}

// Number of streaming multiprocessors of the current device (for sizing grids).
inline int num_sms() {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return n;
}

}  // namespace fastmtl
