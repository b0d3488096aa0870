// Projection of per-task gradients: P = C G, P_kn = Σ_i C_ki G_in, for G (T, N), C (T', T).
//
// project_kernel, grid (row tiles, column blocks): block (r, b) computes rows
// [r * TR, min(T', (r + 1) * TR)) of P over its columns; the row tile varies fastest, so the
// blocks resident at one time read the same columns of G (when T' > TR, the re-reads of a
// column block by the other row tiles hit L2) and, for T' <= TR, G is read exactly once.
// A thread owns VEC consecutive columns (grid-stride loop over N) and keeps its TR x VEC tile
// of P in registers in acc_t (float32; float64 for float64 G), summing i = 0, 1, ..., T-1 in
// that order: each output's sum has a fixed order independent of the grid and of alignment
// (the vectorised and the scalar loads give the same values), so results are bitwise
// reproducible. The coefficients are read from Ct = Cᵀ padded with zeros to (T, tiles * TR)
// (built by the launcher, T x T' values): row i of a tile is TR contiguous, aligned values,
// loaded as vectors by every thread of the block alike (cached broadcast loads), and the
// zero padding keeps the inner loop free of row checks. Each output is written once, rounded
// once to out's dtype (G's dtype or acc_t). out must not overlap G.
#include <algorithm>

#include "common.cuh"

namespace fastmtl {
namespace {

constexpr int kProjectThreads = 256;
constexpr int kBlocksPerSm = 16;  // grid cap, in blocks per SM (grid-stride loop beyond it)
constexpr int kMaxTileRows = 16;  // TR: rows of P per block (registers: TR x VEC accumulators)

template <typename scalar_t, typename acc_t, typename out_t, int TR, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kProjectThreads)
    project_kernel(const acc_t* __restrict__ Ct, int64_t ldc, const scalar_t* __restrict__ G,
                   int64_t ld, int T, int64_t N, out_t* __restrict__ P, int64_t ldp, int TP) {
  const int r0 = static_cast<int>(blockIdx.x) * TR;
  const int rows = TP - r0 < TR ? TP - r0 : TR;
  const acc_t* ct = Ct + r0;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kProjectThreads * VEC;
  for (int64_t c = (static_cast<int64_t>(blockIdx.y) * kProjectThreads + threadIdx.x) * VEC;
       c < N; c += step) {
    acc_t acc[TR][VEC];
#pragma unroll
    for (int r = 0; r < TR; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r][v] = acc_t(0);
#pragma unroll 2
    for (int i = 0; i < T; ++i) {
      acc_t g[VEC];
      load_cols<scalar_t, acc_t, VEC, VECTORIZED>(G + static_cast<int64_t>(i) * ld, c, N, g);
      const Packed<acc_t, TR> w =
          *reinterpret_cast<const Packed<acc_t, TR>*>(ct + static_cast<int64_t>(i) * ldc);
#pragma unroll
      for (int r = 0; r < TR; ++r)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r][v] += w.v[r] * g[v];
    }
#pragma unroll
    for (int r = 0; r < TR; ++r)
      if (r < rows)
        store_cols<out_t, acc_t, VEC, VECTORIZED>(P + static_cast<int64_t>(r0 + r) * ldp, c, N,
                                                  acc[r]);
  }
}

template <typename scalar_t, typename acc_t, typename out_t, int TR>
void launch_project(const at::Tensor& C, const at::Tensor& G, at::Tensor& out,
                    cudaStream_t stream) {
  // 16-byte loads of G for fp32 (4) and fp64 (2), 8-byte for fp16/bf16 (4): TR x VEC
  // accumulators per thread stay within the register budget at TR = 16.
  constexpr int VEC = sizeof(scalar_t) == 8 ? 2 : 4;
  const int T = static_cast<int>(G.size(0));
  const int TP = static_cast<int>(C.size(0));
  const int64_t N = G.size(1), ld = G.stride(0), ldp = out.stride(0);
  const int64_t tiles = (TP + TR - 1) / TR;
  TORCH_CHECK(tiles <= INT32_MAX, "project: T' = ", TP, " rows is too many");

  // Ct = Cᵀ, zero-padded to (T, tiles * TR): a fresh allocation, so every row tile of a row
  // of Ct starts on a multiple of TR * sizeof(acc_t) bytes.
  const at::Tensor Ct = at::constant_pad_nd(C.t(), {0, tiles * TR - TP}, 0).contiguous();
  const acc_t* ct = Ct.const_data_ptr<acc_t>();
  TORCH_INTERNAL_ASSERT(is_aligned(ct, sizeof(acc_t) * TR), "project: Ct is misaligned");

  const scalar_t* g = G.const_data_ptr<scalar_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  const bool vectorized = is_aligned(g, sizeof(scalar_t) * VEC) && (T == 1 || ld % VEC == 0) &&
                          is_aligned(o, sizeof(out_t) * VEC) && (TP == 1 || ldp % VEC == 0);
  const int64_t per_block = static_cast<int64_t>(kProjectThreads) * VEC;
  const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(kBlocksPerSm) * num_sms() / tiles);
  const int64_t blocks = std::min<int64_t>({(N + per_block - 1) / per_block, want, 65535});
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(blocks));
  if (vectorized) {
    project_kernel<scalar_t, acc_t, out_t, TR, VEC, true><<<grid, kProjectThreads, 0, stream>>>(
        ct, tiles * TR, g, ld, T, N, o, ldp, TP);
  } else {
    project_kernel<scalar_t, acc_t, out_t, TR, VEC, false><<<grid, kProjectThreads, 0, stream>>>(
        ct, tiles * TR, g, ld, T, N, o, ldp, TP);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Smallest row tile of {1, 2, 4, 8, 16} holding T' rows (16 beyond: several tiles).
template <typename scalar_t, typename acc_t, typename out_t>
void dispatch_rows(const at::Tensor& C, const at::Tensor& G, at::Tensor& out,
                   cudaStream_t stream) {
  const int64_t TP = C.size(0);
  if (TP <= 1) {
    launch_project<scalar_t, acc_t, out_t, 1>(C, G, out, stream);
  } else if (TP <= 2) {
    launch_project<scalar_t, acc_t, out_t, 2>(C, G, out, stream);
  } else if (TP <= 4) {
    launch_project<scalar_t, acc_t, out_t, 4>(C, G, out, stream);
  } else if (TP <= 8) {
    launch_project<scalar_t, acc_t, out_t, 8>(C, G, out, stream);
  } else {
    launch_project<scalar_t, acc_t, out_t, kMaxTileRows>(C, G, out, stream);
  }
}

}  // namespace

// out = C G for G (T, N) on a CUDA device with unit stride along N, C (T', T) in the
// accumulation dtype (float32; float64 for float64 G; any strides), out (T', N) with unit
// stride along N in G's dtype or the accumulation dtype, not overlapping G.
void project_cuda(const at::Tensor& C, const at::Tensor& G, at::Tensor& out) {
  check_matrix(G, "project");
  const at::ScalarType acc = acc_scalar_type(G.scalar_type());
  TORCH_CHECK(C.is_cuda() && C.device() == G.device(), "project: C is on ", C.device(),
              " but G is on ", G.device());
  TORCH_CHECK(C.dim() == 2 && C.size(1) == G.size(0) && C.size(0) >= 1,
              "project: C must have shape (T', ", G.size(0), ") with T' >= 1 to match G of shape ",
              G.sizes(), ", got ", C.sizes());
  TORCH_CHECK(C.size(0) <= INT32_MAX, "project: T' = ", C.size(0), " rows is too many");
  TORCH_CHECK(C.scalar_type() == acc, "project: C must have dtype ", acc, " for G of dtype ",
              G.scalar_type(), ", got ", C.scalar_type());
  TORCH_CHECK(out.is_cuda() && out.device() == G.device(), "project: out is on ", out.device(),
              " but G is on ", G.device());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == C.size(0) && out.size(1) == G.size(1),
              "project: out must have shape (", C.size(0), ", ", G.size(1), "), got ",
              out.sizes());
  TORCH_CHECK(out.stride(1) == 1 || out.size(1) == 1,
              "project: out must have unit stride along N (dim 1), got strides ", out.strides());
  TORCH_CHECK(out.scalar_type() == G.scalar_type() || out.scalar_type() == acc,
              "project: out must have dtype ", G.scalar_type(), " or ", acc, ", got ",
              out.scalar_type());
  const at::cuda::OptionalCUDAGuard guard(G.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  G.scalar_type(), "fastmtl_project", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    if (out.scalar_type() == G.scalar_type()) {
      dispatch_rows<scalar_t, acc_t, scalar_t>(C, G, out, stream);
    } else {
      dispatch_rows<scalar_t, acc_t, acc_t>(C, G, out, stream);
    }
  });
}

}  // namespace fastmtl
