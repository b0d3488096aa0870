// Trial points of a line search: Z_k = z - t_k d for k < K, z and d flat (N,), Z (K, N).
//
// trial_points_kernel: a thread owns VEC consecutive elements, loads z and d once (converted
// to acc_t: float32, float64 for float64 inputs) and writes the K outputs z - t_k d, each
// rounded once to the input dtype. One read of z and d, one write of Z: (2 + K) N elements
// moved instead of 3 K N for K separate expressions. No reduction: every output element
// depends only on its own inputs, so results do not depend on the grid or on alignment.
#include <algorithm>

#include "common.cuh"

namespace fastmtl {
namespace {

constexpr int kTrialThreads = 256;
constexpr int kTrialBlocksPerSm = 32;  // grid cap, in blocks per SM (grid-stride loop beyond)

template <typename scalar_t, typename acc_t, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kTrialThreads)
    trial_points_kernel(const scalar_t* z, const scalar_t* d, const acc_t* steps, int64_t K,
                        int64_t N, scalar_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTrialThreads * VEC;
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * kTrialThreads + threadIdx.x) * VEC;
       c < N; c += stride) {
    acc_t zv[VEC], dv[VEC];
    load_cols<scalar_t, acc_t, VEC, VECTORIZED>(z, c, N, zv);
    load_cols<scalar_t, acc_t, VEC, VECTORIZED>(d, c, N, dv);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t t = steps[k];
      acc_t o[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) o[v] = zv[v] - t * dv[v];
      store_cols<scalar_t, acc_t, VEC, VECTORIZED>(out + k * N, c, N, o);
    }
  }
}

template <typename scalar_t, typename acc_t>
void launch_trial_points(const at::Tensor& z, const at::Tensor& d, const at::Tensor& steps,
                         at::Tensor& out, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);  // 16-byte loads and stores
  const int64_t N = z.numel(), K = steps.numel();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* dp = d.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const acc_t* tp = steps.const_data_ptr<acc_t>();
  // Row k of out starts at o + k N: vector stores need N % VEC == 0 when K > 1.
  const int64_t bytes = static_cast<int64_t>(sizeof(scalar_t)) * VEC;
  const bool vectorized = is_aligned(zp, bytes) && is_aligned(dp, bytes) &&
                          is_aligned(o, bytes) && (K == 1 || N % VEC == 0);
  const int64_t per_block = static_cast<int64_t>(kTrialThreads) * VEC;
  const int64_t blocks = std::min<int64_t>((N + per_block - 1) / per_block,
                                           static_cast<int64_t>(kTrialBlocksPerSm) * num_sms());
  if (vectorized) {
    trial_points_kernel<scalar_t, acc_t, VEC, true>
        <<<static_cast<unsigned>(blocks), kTrialThreads, 0, stream>>>(zp, dp, tp, K, N, o);
  } else {
    trial_points_kernel<scalar_t, acc_t, VEC, false>
        <<<static_cast<unsigned>(blocks), kTrialThreads, 0, stream>>>(zp, dp, tp, K, N, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// out[k] = z - steps[k] d for contiguous z, d (N,) of one dtype on a CUDA device, steps (K,)
// in the accumulation dtype (float32; float64 for float64 z), out (K, N) contiguous in z's
// dtype.
void trial_points_cuda(const at::Tensor& z, const at::Tensor& d, const at::Tensor& steps_in,
                       at::Tensor& out) {
  TORCH_CHECK(z.is_cuda(), "trial_points: z must be a CUDA tensor, got device ", z.device());
  TORCH_CHECK(is_kernel_dtype(z.scalar_type()),
              "trial_points: z must be float16, bfloat16, float32 or float64, got ",
              z.scalar_type());
  TORCH_CHECK(z.dim() == 1 && z.is_contiguous(), "trial_points: z must be 1-D contiguous");
  TORCH_CHECK(d.device() == z.device(), "trial_points: d is on ", d.device(), " but z is on ",
              z.device());
  TORCH_CHECK(d.sizes() == z.sizes() && d.is_contiguous() &&
                  d.scalar_type() == z.scalar_type(),
              "trial_points: d must be contiguous with z's shape and dtype");
  const at::ScalarType acc = acc_scalar_type(z.scalar_type());
  TORCH_CHECK(steps_in.device() == z.device() && steps_in.dim() == 1,
              "trial_points: steps must be 1-D on z's device");
  TORCH_CHECK(steps_in.scalar_type() == acc, "trial_points: steps must have dtype ", acc,
              " for z of dtype ", z.scalar_type(), ", got ", steps_in.scalar_type());
  TORCH_CHECK(out.device() == z.device() && out.is_contiguous() &&
                  out.scalar_type() == z.scalar_type() && out.dim() == 2 &&
                  out.size(0) == steps_in.size(0) && out.size(1) == z.size(0),
              "trial_points: out must be contiguous (K, N) in z's dtype, got ", out.sizes());
  if (z.numel() == 0 || steps_in.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard guard(z.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor steps = steps_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  z.scalar_type(), "fastmtl_trial_points", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    launch_trial_points<scalar_t, acc_t>(z, d, steps, out, stream);
  });
}

}  // namespace fastmtl
