// Python bindings of the compiled extension fastmtl._C (the one bindings file of csrc/).
// Called only from fastmtl/_ext.py, with arguments already validated by fastmtl.ops; the
// kernels check them again (TORCH_CHECK raises RuntimeError with the op's name).
#include <torch/extension.h>

namespace fastmtl {
at::Tensor gram_cuda(const at::Tensor& G);                                      // gram.cu
void combine_cuda(const at::Tensor& w, const at::Tensor& G, at::Tensor& out,  // combine.cu
                  bool accumulate);
void project_cuda(const at::Tensor& C, const at::Tensor& G, at::Tensor& out);  // project.cu
void trial_points_cuda(const at::Tensor& z, const at::Tensor& d,  // trial_points.cu
                       const at::Tensor& steps, at::Tensor& out);
void adatask_cuda(const at::Tensor& ptrs, const at::Tensor& sizes,  // adatask.cu
                  const at::Tensor& blocks, const std::optional<at::Tensor>& active,
                  const at::Tensor& param_like, const at::Tensor& grad_like,
                  const at::Tensor& state_like, int64_t block, int64_t algo, double lr,
                  double weight_decay, double eps, double a, double b, double lr_decay,
                  bool amsgrad, bool maximize, bool decoupled);
}  // namespace fastmtl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmtl CUDA kernels (see csrc/ and fastmtl/ops for the torch references)";
  m.def("gram", &fastmtl::gram_cuda, py::arg("G"),
        "K = G G^T for G (T, N) on a CUDA device: (T, T) float32 (float64 for float64 G); "
        "split-N partial Grams reduced in a fixed order (deterministic, exactly symmetric).");
  m.def("combine", &fastmtl::combine_cuda, py::arg("w"), py::arg("G"), py::arg("out"),
        py::arg("accumulate"),
        "out = G^T w (accumulate=False) or out += G^T w (accumulate=True) for G (T, N), "
        "w (T,) in the accumulation dtype, out (N,) contiguous in G's or the accumulation "
        "dtype; accumulated in float32 (float64 for float64 G).");
  m.def("project", &fastmtl::project_cuda, py::arg("C"), py::arg("G"), py::arg("out"),
        "out = C G for G (T, N), C (T', T) in the accumulation dtype, out (T', N) with unit "
        "stride along N in G's or the accumulation dtype (not overlapping G); one pass over G, "
        "accumulated in float32 (float64 for float64 G).");
  m.def("trial_points", &fastmtl::trial_points_cuda, py::arg("z"), py::arg("d"),
        py::arg("steps"), py::arg("out"),
        "out[k] = z - steps[k] d for contiguous z, d (N,) of one dtype, steps (K,) in the "
        "accumulation dtype, out (K, N) contiguous in z's dtype; z and d read once.");
  m.def("adatask", &fastmtl::adatask_cuda, py::arg("ptrs"), py::arg("sizes"),
        py::arg("blocks"), py::arg("active"), py::arg("param_like"), py::arg("grad_like"),
        py::arg("state_like"), py::arg("block"), py::arg("algo"), py::arg("lr"),
        py::arg("weight_decay"), py::arg("eps"), py::arg("a"), py::arg("b"),
        py::arg("lr_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        "AdaTask update (algo 0/1/2: Adam/RMSprop/Adagrad) of every tensor of the address "
        "tables of fastmtl.kernels._tables.launch_tables in one launch; active None or (P, T) "
        "int8; arithmetic in float32 (float64 for float64 params).");
}
