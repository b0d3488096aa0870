// Combination of per-task gradients: d = Gᵀ w, d_n = Σ_i w_i G_in, for G (T, N), w (T,).
//
// combine_kernel writes out_n = d_n (accumulate=false) or out_n = d_n + out_n (accumulate=true,
// the sum first, then the old value added once), accumulating in acc_t (float32; float64 for
// float64 G) and rounding once to out's dtype (G's dtype or acc_t). One pass over G, grid over
// N: a thread owns VEC consecutive columns and sums i = 0, 1, ..., T-1 in that order, so each
// column's sum has a fixed order independent of the grid and of alignment (the vectorised and
// the scalar loads give the same values). A thread reads and writes only its own columns, so
// out may even be a row of G.
#include <algorithm>

#include "common.cuh"

namespace fastmtl {
namespace {

constexpr int kCombineThreads = 256;
constexpr int kBlocksPerSm = 32;  // grid cap, in blocks per SM (grid-stride loop beyond it)

template <typename scalar_t, typename acc_t, typename out_t, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const acc_t* w, const scalar_t* G, int64_t ld, int T, int64_t N, out_t* out,
                   bool accumulate) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kCombineThreads * VEC;
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x) * VEC;
       c < N; c += step) {
    acc_t d[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) d[v] = acc_t(0);
#pragma unroll 4
    for (int i = 0; i < T; ++i) {
      const acc_t wi = w[i];
      acc_t g[VEC];
      load_cols<scalar_t, acc_t, VEC, VECTORIZED>(G + static_cast<int64_t>(i) * ld, c, N, g);
#pragma unroll
      for (int v = 0; v < VEC; ++v) d[v] += wi * g[v];
    }
    if (accumulate) {
      acc_t old[VEC];
      load_cols<out_t, acc_t, VEC, VECTORIZED>(out, c, N, old);
#pragma unroll
      for (int v = 0; v < VEC; ++v) d[v] += old[v];
    }
    store_cols<out_t, acc_t, VEC, VECTORIZED>(out, c, N, d);
  }
}

template <typename scalar_t, typename acc_t, typename out_t>
void launch_combine(const at::Tensor& w, const at::Tensor& G, at::Tensor& out, bool accumulate,
                    cudaStream_t stream) {
  // 16-byte loads of G (fp32: 4, fp64: 2, fp16/bf16: 8 elements).
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int T = static_cast<int>(G.size(0));
  const int64_t N = G.size(1), ld = G.stride(0);
  const scalar_t* g = G.const_data_ptr<scalar_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  const bool vectorized = is_aligned(g, sizeof(scalar_t) * VEC) &&
                          (T == 1 || ld % VEC == 0) && is_aligned(o, sizeof(out_t) * VEC);
  const int64_t per_block = static_cast<int64_t>(kCombineThreads) * VEC;
  const int64_t blocks = std::min<int64_t>((N + per_block - 1) / per_block,
                                           static_cast<int64_t>(kBlocksPerSm) * num_sms());
  const acc_t* wp = w.const_data_ptr<acc_t>();
  if (vectorized) {
    combine_kernel<scalar_t, acc_t, out_t, VEC, true>
        <<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(wp, g, ld, T, N, o,
                                                                         accumulate);
  } else {
    combine_kernel<scalar_t, acc_t, out_t, VEC, false>
        <<<static_cast<unsigned>(blocks), kCombineThreads, 0, stream>>>(wp, g, ld, T, N, o,
                                                                         accumulate);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// out = Gᵀ w (accumulate=false) or out += Gᵀ w (accumulate=true) for G (T, N) on a CUDA
// device with unit stride along N, w (T,) in the accumulation dtype (float32; float64 for
// float64 G), out (N,) contiguous in G's dtype or the accumulation dtype.
void combine_cuda(const at::Tensor& w_in, const at::Tensor& G, at::Tensor& out,
                  bool accumulate) {
  check_matrix(G, "combine");
  const at::ScalarType acc = acc_scalar_type(G.scalar_type());
  TORCH_CHECK(w_in.is_cuda() && w_in.device() == G.device(), "combine: w is on ",
              w_in.device(), " but G is on ", G.device());
  TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == G.size(0), "combine: w must have shape (",
              G.size(0), ",) to match G of shape ", G.sizes(), ", got ", w_in.sizes());
  TORCH_CHECK(w_in.scalar_type() == acc, "combine: w must have dtype ", acc, " for G of dtype ",
              G.scalar_type(), ", got ", w_in.scalar_type());
  TORCH_CHECK(out.is_cuda() && out.device() == G.device(), "combine: out is on ", out.device(),
              " but G is on ", G.device());
  TORCH_CHECK(out.dim() == 1 && out.size(0) == G.size(1), "combine: out must have shape (",
              G.size(1), ",) to match G of shape ", G.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "combine: out must be contiguous");
  TORCH_CHECK(out.scalar_type() == G.scalar_type() || out.scalar_type() == acc,
              "combine: out must have dtype ", G.scalar_type(), " or ", acc, ", got ",
              out.scalar_type());
  const at::cuda::OptionalCUDAGuard guard(G.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor w = w_in.contiguous();  // T values; a no-op when already contiguous

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  G.scalar_type(), "fastmtl_combine", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    if (out.scalar_type() == G.scalar_type()) {
      launch_combine<scalar_t, acc_t, scalar_t>(w, G, out, accumulate, stream);
    } else {
      launch_combine<scalar_t, acc_t, acc_t>(w, G, out, accumulate, stream);
    }
  });
}

}  // namespace fastmtl
