// Gram matrix of per-task gradients: K = G Gᵀ, K_ij = Σ_n G_in G_jn, for G (T, N).
//
// Accumulation in acc_t (float32; float64 for float64 G; no TF32), deterministic, no atomics:
//   1. gram_partial_kernel, grid (tile pair p, split s). K is cut into TI x TI tiles; only
//      the upper-triangle tile pairs (bi <= bj) are computed, diagonal tiles only for i <= j.
//      Split s covers the column chunk [s * chunk, min(N, (s + 1) * chunk)). Thread t of the
//      block owns columns c = s * chunk + k * (THREADS * VEC) + t * VEC + v, k = 0, 1, ...,
//      v = 0..VEC-1, and sums G_ic G_jc over them in that order (k, then v) in registers; the
//      THREADS partial sums are then reduced by a fixed tree (warp shuffles, then warps 0..7
//      in order) and written to ws[s, i, j]. Each G element is read once per tile pair.
//   2. gram_reduce_kernel: K_ij = K_ji = Σ_s ws[s, i, j] for i <= j, with lane l of a warp
//      summing s = l, l + 32, ... in order and a fixed shuffle tree over the 32 lanes.
// The order depends only on (T, N, dtype, number of SMs), never on alignment (the vectorised
// and the scalar loads feed the same sums), so results are bitwise reproducible; K is exactly
// symmetric since each K_ij = K_ji is computed once and mirrored.
#include <algorithm>

#include "common.cuh"

namespace fastmtl {
namespace {

constexpr int kGramThreads = 256;
constexpr int kGramWarps = kGramThreads / kWarpSize;
constexpr int kMinItersPerSplit = 8;  // column sweeps per thread before splitting N further
constexpr int kBlocksPerSm = 8;       // target grid size, in blocks per SM
constexpr int64_t kMaxSplits = 4096;  // bounds the (SPLIT, T, T) workspace and gridDim.y

// Sum over this block's columns of the TI x TI outer products of rows (bi*TI + i) and
// (bj*TI + j); DIAG (bi == bj): rows read once, only i <= j. Writes ws[s, row_i, row_j].
template <typename scalar_t, typename acc_t, int TI, int VEC, bool VECTORIZED, bool DIAG>
__device__ __forceinline__ void gram_tile(const scalar_t* __restrict__ G, int64_t ld, int T,
                                          int64_t c_begin, int64_t c_end, int bi, int bj,
                                          acc_t* __restrict__ ws_s, acc_t* red) {
  const scalar_t* a_rows[TI];
  const scalar_t* b_rows[TI];
  bool a_ok[TI], b_ok[TI];
#pragma unroll
  for (int i = 0; i < TI; ++i) {
    const int ra = bi * TI + i, rb = bj * TI + i;
    a_ok[i] = ra < T;
    b_ok[i] = rb < T;
    a_rows[i] = G + static_cast<int64_t>(a_ok[i] ? ra : 0) * ld;
    b_rows[i] = G + static_cast<int64_t>(b_ok[i] ? rb : 0) * ld;
  }

  acc_t acc[TI][TI];
#pragma unroll
  for (int i = 0; i < TI; ++i)
#pragma unroll
    for (int j = 0; j < TI; ++j) acc[i][j] = acc_t(0);

  for (int64_t c = c_begin + static_cast<int64_t>(threadIdx.x) * VEC; c < c_end;
       c += static_cast<int64_t>(kGramThreads) * VEC) {
    acc_t a[TI][VEC];
    acc_t b[DIAG ? 1 : TI][VEC];
#pragma unroll
    for (int i = 0; i < TI; ++i) {
      if (a_ok[i]) {
        load_cols<scalar_t, acc_t, VEC, VECTORIZED>(a_rows[i], c, c_end, a[i]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) a[i][v] = acc_t(0);
      }
    }
    if (!DIAG) {
#pragma unroll
      for (int j = 0; j < TI; ++j) {
        if (b_ok[j]) {
          load_cols<scalar_t, acc_t, VEC, VECTORIZED>(b_rows[j], c, c_end, b[DIAG ? 0 : j]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) b[DIAG ? 0 : j][v] = acc_t(0);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v)
#pragma unroll
      for (int i = 0; i < TI; ++i)
#pragma unroll
        for (int j = DIAG ? i : 0; j < TI; ++j)
          acc[i][j] += a[i][v] * (DIAG ? a[j][v] : b[DIAG ? 0 : j][v]);
  }

  // Block reduction in a fixed order: shuffle tree within each warp, then warps in order.
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < TI; ++i)
#pragma unroll
    for (int j = DIAG ? i : 0; j < TI; ++j) {
      acc_t v = acc[i][j];
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp * TI * TI + i * TI + j] = v;
    }
  __syncthreads();
  for (int e = threadIdx.x; e < TI * TI; e += kGramThreads) {
    const int i = e / TI, j = e % TI;
    const int ri = bi * TI + i, rj = bj * TI + j;
    if ((DIAG && j < i) || ri >= T || rj >= T) continue;
    acc_t s = red[e];
    for (int w = 1; w < kGramWarps; ++w) s += red[w * TI * TI + e];
    ws_s[static_cast<int64_t>(ri) * T + rj] = s;
  }
}

// grid (num tile pairs, num splits): the pair index varies fastest, so the blocks resident at
// one time read the same column chunks (the re-reads of a row by other tile pairs hit L2).
template <typename scalar_t, typename acc_t, int TI, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kGramThreads)
    gram_partial_kernel(const scalar_t* __restrict__ G, int64_t ld, int T, int64_t N, int nt,
                        int64_t chunk, acc_t* __restrict__ ws) {
  __shared__ acc_t red[kGramWarps * TI * TI];
  int p = blockIdx.x, bi = 0;  // p-th pair (bi, bj), bi <= bj, in row-major order
  while (p >= nt - bi) {
    p -= nt - bi;
    ++bi;
  }
  const int bj = bi + p;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t c_end = c_begin + chunk < N ? c_begin + chunk : N;
  acc_t* ws_s = ws + static_cast<int64_t>(blockIdx.y) * T * T;
  if (bi == bj) {
    gram_tile<scalar_t, acc_t, TI, VEC, VECTORIZED, true>(G, ld, T, c_begin, c_end, bi, bj,
                                                          ws_s, red);
  } else {
    gram_tile<scalar_t, acc_t, TI, VEC, VECTORIZED, false>(G, ld, T, c_begin, c_end, bi, bj,
                                                           ws_s, red);
  }
}

// One warp per entry (i, j) of K with i <= j: K_ij = K_ji = Σ_s ws[s, i, j] (fixed order).
template <typename acc_t>
__global__ void __launch_bounds__(kGramThreads)
    gram_reduce_kernel(const acc_t* __restrict__ ws, int T, int64_t splits,
                       acc_t* __restrict__ K) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * kGramThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (e >= static_cast<int64_t>(T) * T) return;
  const int i = static_cast<int>(e / T), j = static_cast<int>(e % T);
  if (i > j) return;  // uniform across the warp
  const int64_t TT = static_cast<int64_t>(T) * T;
  acc_t s = acc_t(0);
  for (int64_t k = lane; k < splits; k += kWarpSize) s += ws[k * TT + e];
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane == 0) {
    K[static_cast<int64_t>(i) * T + j] = s;
    K[static_cast<int64_t>(j) * T + i] = s;
  }
}

template <typename scalar_t, typename acc_t, int TI, int VEC>
void launch_gram(const at::Tensor& G, at::Tensor& K, cudaStream_t stream) {
  const int T = static_cast<int>(G.size(0));
  const int64_t N = G.size(1), ld = G.stride(0);
  const int nt = (T + TI - 1) / TI;
  const int64_t pairs = static_cast<int64_t>(nt) * (nt + 1) / 2;
  TORCH_CHECK(static_cast<int64_t>(T) * T <= INT32_MAX, "gram: T = ", T, " is too large");

  // Splits of N: enough blocks to fill the device, each thread sweeping its split at least
  // kMinItersPerSplit times; chunks are whole sweeps, so every chunk start is VEC-aligned.
  const int64_t sweep = static_cast<int64_t>(kGramThreads) * VEC;
  const int64_t sweeps = (N + sweep - 1) / sweep;
  const int64_t want = (static_cast<int64_t>(kBlocksPerSm) * num_sms() + pairs - 1) / pairs;
  int64_t splits = (sweeps + kMinItersPerSplit - 1) / kMinItersPerSplit;
  splits = std::max<int64_t>(1, std::min({splits, want, kMaxSplits}));
  const int64_t chunk = ((sweeps + splits - 1) / splits) * sweep;
  splits = (N + chunk - 1) / chunk;  // every split non-empty

  at::Tensor ws = at::empty({splits, T, T}, K.options());
  const scalar_t* g = G.const_data_ptr<scalar_t>();
  const bool vectorized =
      is_aligned(g, sizeof(scalar_t) * VEC) && (T == 1 || ld % VEC == 0);
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(splits));
  if (vectorized) {
    gram_partial_kernel<scalar_t, acc_t, TI, VEC, true><<<grid, kGramThreads, 0, stream>>>(
        g, ld, T, N, nt, chunk, ws.mutable_data_ptr<acc_t>());
  } else {
    gram_partial_kernel<scalar_t, acc_t, TI, VEC, false><<<grid, kGramThreads, 0, stream>>>(
        g, ld, T, N, nt, chunk, ws.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t warps = static_cast<int64_t>(T) * T;
  const int64_t blocks = (warps + kGramWarps - 1) / kGramWarps;
  gram_reduce_kernel<acc_t><<<static_cast<unsigned>(blocks), kGramThreads, 0, stream>>>(
      ws.const_data_ptr<acc_t>(), T, splits, K.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// K = G Gᵀ for G (T, N) on a CUDA device, unit stride along N: (T, T) in the accumulation
// dtype (float32; float64 for float64 G).
at::Tensor gram_cuda(const at::Tensor& G) {
  check_matrix(G, "gram");
  const at::cuda::OptionalCUDAGuard guard(G.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t T = G.size(0);
  at::Tensor K = at::empty({T, T}, G.options().dtype(acc_scalar_type(G.scalar_type())));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  G.scalar_type(), "fastmtl_gram", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    // Tiles of 4 rows for small T (less idle work) and for fp64 (register budget), else 8.
    // Loads of 16 bytes (fp32: 4, fp64: 2 elements) or 8 bytes (fp16/bf16: 4 elements).
    constexpr int VEC = sizeof(scalar_t) == 8 ? 2 : 4;
    if constexpr (sizeof(scalar_t) == 8) {
      launch_gram<scalar_t, acc_t, 4, VEC>(G, K, stream);
    } else if (T <= 4) {
      launch_gram<scalar_t, acc_t, 4, VEC>(G, K, stream);
    } else {
      launch_gram<scalar_t, acc_t, 8, VEC>(G, K, stream);
    }
  });
  return K;
}

}  // namespace fastmtl
