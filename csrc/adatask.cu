// AdaTask updates (fastmtl.ops.adatask; spec: adatask_reference): per-task moments on shared
// parameters, every tensor of a list in one launch.
//
// For a parameter θ with T task gradients g_1..g_T and per-task moments, every active task k
// updates its own moments and θ takes the sum of the per-task steps:
//
//   θ ← θ(1 − ηλ)_decoupled − Σ_{k active} u_k,
//   g_k ← ±g_k + (λ/T) θ   (coupled L2, with θ before the step; the sign first, as torch)
//   Adam    (ALGO 0): m_k = β1 m_k + (1−β1) g_k,  v_k = β2 v_k + (1−β2) g_k²  (amsgrad:
//                     v_k ← max(v̂_k, v_k), stored in v̂_k),
//                     u_k = η/(1−β1^t) · m_k / (√v_k / √(1−β2^t) + ε)
//   RMSprop (ALGO 1): v_k = α v_k + (1−α) g_k²,  u_k = η g_k / (√v_k + ε)
//   Adagrad (ALGO 2): s_k = s_k + g_k²,  u_k = η/(1 + (t − 1)δ) · g_k / (√s_k + ε)
//
// t = t_k is task k's step counter (float32 on the device, already incremented by the Python
// side for the active tasks). The tensors are reached through tables built by
// fastmtl.kernels._tables.launch_tables (the same ones as the Triton kernel):
//   ptrs   (6, P) int64: addresses of param, grad, exp_avg, exp_avg_sq, max (or exp_avg_sq
//          again), step of tensor i in column i;
//   sizes  (2, P) int64: numel n_i, gradient row stride;
//   blocks (B, 2) int32: (tensor i, first element) of CUDA block b, kAdataskBlock elements each.
// Block b reads its θ once, then for k = 0..T-1 (skipping tasks with active[i, k] == 0) reads
// g_k and the task's moments, writes the moments back and accumulates the step, and writes θ
// once. Moments of task k are row k of a contiguous (T, n_i) tensor; the gradient rows are
// g + k * stride (unit stride inside a row). A thread owns kAdataskItems elements
// kAdataskThreads apart (coalesced accesses, independent loads in flight), so no alignment
// requirement. Per-task coefficients (bias corrections, Adagrad step size, the active flag)
// are computed once per block into shared memory.
//
// Arithmetic on the elements in acc_t (float32; float64 for float64 params) whatever the
// storage dtype of the moments (float16/bfloat16/float32/float64); the hyperparameters arrive
// as double and the bias corrections 1 − β^t are computed in double, then rounded once to acc_t
// (as the Triton kernel does). Every element depends only on its own inputs: results do not
// depend on the grid.
#include <cmath>

#include "common.cuh"

namespace fastmtl {
namespace {

constexpr int kAdataskThreads = 256;
constexpr int kAdataskItems = 4;  // elements per thread
constexpr int64_t kAdataskBlock = static_cast<int64_t>(kAdataskThreads) * kAdataskItems;

struct AdataskArgs {
  const int64_t* ptrs;    // (6, P)
  const int64_t* sizes;   // (2, P)
  const int32_t* blocks;  // (B, 2)
  const int8_t* active;   // (P, T) or nullptr (all tasks active)
  int64_t P;
  int64_t T;
  double lr, weight_decay, eps, a, b, lr_decay;  // a: β1 (Adam) or α (RMSprop); b: β2 (Adam)
  bool amsgrad, maximize, coupled, decoupled;
};

// Task k's gradient at element e: ±g (maximize, torch's order: the sign first) plus the
// coupled decay (λ/T)θ with θ before the step.
template <typename acc_t, typename param_t>
__device__ __forceinline__ acc_t task_gradient(const param_t* gk, int64_t e, acc_t theta,
                                               const AdataskArgs& args, acc_t wd_T) {
  acc_t g = static_cast<acc_t>(gk[e]);
  if (args.maximize) g = -g;
  if (args.coupled) g = g + wd_T * theta;
  return g;
}

template <typename param_t, typename state_t, typename acc_t, int ALGO>
__global__ void __launch_bounds__(kAdataskThreads) adatask_kernel(const AdataskArgs args) {
  const int64_t P = args.P, T = args.T;
  const int64_t i = args.blocks[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t start = args.blocks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t n = args.sizes[i];
  const int64_t g_stride = args.sizes[P + i];
  param_t* p = reinterpret_cast<param_t*>(args.ptrs[i]);
  const param_t* g = reinterpret_cast<const param_t*>(args.ptrs[P + i]);
  state_t* m = reinterpret_cast<state_t*>(args.ptrs[2 * P + i]);
  state_t* v = reinterpret_cast<state_t*>(args.ptrs[3 * P + i]);
  state_t* x = reinterpret_cast<state_t*>(args.ptrs[4 * P + i]);
  const float* t = reinterpret_cast<const float*>(args.ptrs[5 * P + i]);

  // Task-independent coefficients, computed in double and rounded once to acc_t.
  const acc_t eps = static_cast<acc_t>(args.eps);
  const acc_t wd_T = static_cast<acc_t>(args.weight_decay / static_cast<double>(T));  // λ/T
  const bool lerp_low = 1.0 - args.a < 0.5;  // Adam: lerp weight 1 − β1 below 1/2
  const acc_t c_a = static_cast<acc_t>(ALGO == 0 && lerp_low ? 1.0 - args.a : args.a);
  const acc_t c_1a = static_cast<acc_t>(1.0 - args.a);  // RMSprop: 1 − α
  const acc_t c_b = static_cast<acc_t>(args.b), c_1b = static_cast<acc_t>(1.0 - args.b);
  const acc_t c_lr = static_cast<acc_t>(args.lr);

  int64_t idx[kAdataskItems];
  bool in[kAdataskItems];
  acc_t theta[kAdataskItems], upd[kAdataskItems];
  // θ read once; decoupled decay θ(1 − ηλ) applied once, before the task steps.
  const acc_t keep = static_cast<acc_t>(1.0 - args.lr * args.weight_decay);
#pragma unroll
  for (int j = 0; j < kAdataskItems; ++j) {
    idx[j] = start + threadIdx.x + static_cast<int64_t>(j) * kAdataskThreads;
    in[j] = idx[j] < n;
    theta[j] = in[j] ? static_cast<acc_t>(p[idx[j]]) : acc_t(0);
    upd[j] = args.decoupled ? theta[j] * keep : theta[j];
  }

  // Per-task coefficients, computed in double once per block (not once per thread: pow in
  // float64 is slow on GPUs with few FP64 units) for up to kAdataskThreads tasks at a time,
  // each rounded once to acc_t:
  //   Adam: coef0 = η / (1 − β1^t), coef1 = √(1 − β2^t);  Adagrad: coef0 = η / (1 + (t − 1)δ).
  __shared__ acc_t coef0[kAdataskThreads], coef1[kAdataskThreads];
  __shared__ bool act[kAdataskThreads];
  for (int64_t base = 0; base < T; base += kAdataskThreads) {
    const int chunk = static_cast<int>(T - base < kAdataskThreads ? T - base : kAdataskThreads);
    __syncthreads();  // the previous chunk's coefficients are no longer read
    if (static_cast<int>(threadIdx.x) < chunk) {
      const int64_t k = base + threadIdx.x;
      act[threadIdx.x] = args.active == nullptr || args.active[i * T + k] != 0;
      const double step = static_cast<double>(t[k]);
      if (ALGO == 0) {
        coef0[threadIdx.x] = static_cast<acc_t>(args.lr / (1.0 - pow(args.a, step)));
        coef1[threadIdx.x] = static_cast<acc_t>(sqrt(1.0 - pow(args.b, step)));
      } else if (ALGO == 2) {
        coef0[threadIdx.x] =
            static_cast<acc_t>(args.lr / (1.0 + (step - 1.0) * args.lr_decay));
      }
    }
    __syncthreads();
    for (int c = 0; c < chunk; ++c) {
      if (!act[c]) continue;  // inactive task: moments and θ untouched (uniform per block)
      const int64_t k = base + c;
      const param_t* gk = g + k * g_stride;
      const int64_t row = k * n;  // row k of the (T, n) moments
      if (ALGO == 0) {
        const acc_t lr_t = coef0[c], sqrt_bc2 = coef1[c];
#pragma unroll
        for (int j = 0; j < kAdataskItems; ++j) {
          if (!in[j]) continue;
          const acc_t gj = task_gradient(gk, idx[j], theta[j], args, wd_T);
          acc_t mj = static_cast<acc_t>(m[row + idx[j]]);
          acc_t vj = static_cast<acc_t>(v[row + idx[j]]);
          // m = lerp(m, g, 1 − β1) (torch.lerp's two formulas); v = β2 v + (1 − β2) g²
          mj = lerp_low ? mj + c_a * (gj - mj) : gj - (gj - mj) * c_a;
          vj = vj * c_b + c_1b * (gj * gj);
          m[row + idx[j]] = static_cast<state_t>(mj);
          v[row + idx[j]] = static_cast<state_t>(vj);
          if (args.amsgrad) {
            const acc_t xj = static_cast<acc_t>(x[row + idx[j]]);
            vj = xj > vj ? xj : vj;  // v = max(v̂, v), kept in v̂
            x[row + idx[j]] = static_cast<state_t>(vj);
          }
          // θ −= η/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
          const acc_t denom = sqrt(vj) / sqrt_bc2 + eps;
          upd[j] = upd[j] - lr_t * (mj / denom);
        }
      } else if (ALGO == 1) {
#pragma unroll
        for (int j = 0; j < kAdataskItems; ++j) {
          if (!in[j]) continue;
          const acc_t gj = task_gradient(gk, idx[j], theta[j], args, wd_T);
          // v = α v + (1 − α) g²; θ −= η g / (√v + ε)
          acc_t vj = static_cast<acc_t>(v[row + idx[j]]);
          vj = vj * c_a + c_1a * (gj * gj);
          v[row + idx[j]] = static_cast<state_t>(vj);
          upd[j] = upd[j] - c_lr * (gj / (sqrt(vj) + eps));
        }
      } else {
        const acc_t lr_t = coef0[c];  // η_t = η / (1 + (t − 1) δ)
#pragma unroll
        for (int j = 0; j < kAdataskItems; ++j) {
          if (!in[j]) continue;
          const acc_t gj = task_gradient(gk, idx[j], theta[j], args, wd_T);
          // s = s + g²; θ −= η_t g / (√s + ε)
          acc_t sj = static_cast<acc_t>(v[row + idx[j]]);
          sj = sj + gj * gj;
          v[row + idx[j]] = static_cast<state_t>(sj);
          upd[j] = upd[j] - lr_t * (gj / (sqrt(sj) + eps));
        }
      }
    }
  }

  // θ written once.
#pragma unroll
  for (int j = 0; j < kAdataskItems; ++j)
    if (in[j]) p[idx[j]] = static_cast<param_t>(upd[j]);
}

template <typename param_t, typename state_t>
void launch_adatask(const AdataskArgs& args, int64_t algo, int64_t num_blocks,
                    cudaStream_t stream) {
  using acc_t = at::acc_type<param_t, /*is_cuda=*/true>;
  const dim3 grid(static_cast<unsigned>(num_blocks));
  switch (algo) {
    case 0:
      adatask_kernel<param_t, state_t, acc_t, 0><<<grid, kAdataskThreads, 0, stream>>>(args);
      break;
    case 1:
      adatask_kernel<param_t, state_t, acc_t, 1><<<grid, kAdataskThreads, 0, stream>>>(args);
      break;
    default:
      adatask_kernel<param_t, state_t, acc_t, 2><<<grid, kAdataskThreads, 0, stream>>>(args);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// One AdaTask update (algo 0/1/2: Adam/RMSprop/Adagrad) of every tensor of the tables (see
// the top of this file). param_like/grad_like/state_like: params[0], grads[0] (T, n_0) and a
// moment tensor, for the device, the dtypes and T; active: None or (P, T) int8 contiguous.
// The tables hold raw addresses: the caller (fastmtl.ops.adatask) has validated the tensors
// (one device, params and grads of one dtype, moments of one dtype and contiguous).
void adatask_cuda(const at::Tensor& ptrs, const at::Tensor& sizes, const at::Tensor& blocks,
                  const std::optional<at::Tensor>& active, const at::Tensor& param_like,
                  const at::Tensor& grad_like, const at::Tensor& state_like, int64_t block,
                  int64_t algo, double lr, double weight_decay, double eps, double a, double b,
                  double lr_decay, bool amsgrad, bool maximize, bool decoupled) {
  TORCH_CHECK(param_like.is_cuda(), "adatask: params must be CUDA tensors, got device ",
              param_like.device());
  const at::Device device = param_like.device();
  TORCH_CHECK(is_kernel_dtype(param_like.scalar_type()),
              "adatask: params must be float16, bfloat16, float32 or float64, got ",
              param_like.scalar_type());
  TORCH_CHECK(is_kernel_dtype(state_like.scalar_type()),
              "adatask: moments must be float16, bfloat16, float32 or float64, got ",
              state_like.scalar_type());
  TORCH_CHECK(grad_like.scalar_type() == param_like.scalar_type(), "adatask: grads have dtype ",
              grad_like.scalar_type(), " but params have ", param_like.scalar_type());
  TORCH_CHECK(grad_like.device() == device && state_like.device() == device,
              "adatask: grads and moments must be on the params' device ", device);
  TORCH_CHECK(grad_like.dim() >= 1 && grad_like.size(0) >= 1,
              "adatask: grads[0] must have shape (T, ...) with T >= 1, got ", grad_like.sizes());
  TORCH_CHECK(algo >= 0 && algo <= 2, "adatask: algo must be 0 (Adam), 1 (RMSprop) or "
              "2 (Adagrad), got ", algo);
  TORCH_CHECK(block == kAdataskBlock, "adatask: the block table must have ", kAdataskBlock,
              " elements per block, got ", block);
  TORCH_CHECK(ptrs.device() == device && ptrs.scalar_type() == at::kLong && ptrs.dim() == 2 &&
                  ptrs.size(0) == 6 && ptrs.is_contiguous(),
              "adatask: ptrs must be a contiguous (6, P) int64 tensor on ", device, ", got ",
              ptrs.scalar_type(), " ", ptrs.sizes(), " on ", ptrs.device());
  const int64_t P = ptrs.size(1);
  TORCH_CHECK(sizes.device() == device && sizes.scalar_type() == at::kLong &&
                  sizes.dim() == 2 && sizes.size(0) == 2 && sizes.size(1) == P &&
                  sizes.is_contiguous(),
              "adatask: sizes must be a contiguous (2, ", P, ") int64 tensor on ", device,
              ", got ", sizes.scalar_type(), " ", sizes.sizes(), " on ", sizes.device());
  TORCH_CHECK(blocks.device() == device && blocks.scalar_type() == at::kInt &&
                  blocks.dim() == 2 && blocks.size(1) == 2 && blocks.is_contiguous(),
              "adatask: blocks must be a contiguous (B, 2) int32 tensor on ", device, ", got ",
              blocks.scalar_type(), " ", blocks.sizes(), " on ", blocks.device());
  TORCH_CHECK(blocks.size(0) <= INT32_MAX, "adatask: ", blocks.size(0), " blocks is too many");
  const int64_t T = grad_like.size(0);
  const int8_t* active_ptr = nullptr;
  if (active.has_value()) {
    const at::Tensor& act = *active;
    TORCH_CHECK(act.device() == device && act.scalar_type() == at::kChar && act.dim() == 2 &&
                    act.size(0) == P && act.size(1) == T && act.is_contiguous(),
                "adatask: active must be a contiguous (", P, ", ", T, ") int8 tensor on ",
                device, ", got ", act.scalar_type(), " ", act.sizes(), " on ", act.device());
    active_ptr = act.const_data_ptr<int8_t>();
  }
  const int64_t num_blocks = blocks.size(0);
  if (num_blocks == 0 || P == 0) return;

  AdataskArgs args;
  args.ptrs = ptrs.const_data_ptr<int64_t>();
  args.sizes = sizes.const_data_ptr<int64_t>();
  args.blocks = blocks.const_data_ptr<int32_t>();
  args.active = active_ptr;
  args.P = P;
  args.T = T;
  args.lr = lr;
  args.weight_decay = weight_decay;
  args.eps = eps;
  args.a = a;
  args.b = b;
  args.lr_decay = lr_decay;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.coupled = weight_decay != 0.0 && !decoupled;
  args.decoupled = decoupled && weight_decay != 0.0;

  const at::cuda::OptionalCUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  param_like.scalar_type(), "fastmtl_adatask", [&] {
    using param_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                    state_like.scalar_type(), "fastmtl_adatask_state", [&] {
      launch_adatask<param_t, scalar_t>(args, algo, num_blocks, stream);
    });
  });
}

}  // namespace fastmtl
