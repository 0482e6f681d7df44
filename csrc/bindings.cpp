// Registers the fused CPU attention passes as torch operators (torch.ops.causalattn_native.*): schema
// checked calls with no pybind11 module, so this file compiles against the light torch/library.h.
#include <torch/library.h>

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace causalattn_native {

using at::Tensor;

std::vector<Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const std::optional<Tensor>& adapter_keys,
                                      const std::optional<Tensor>& adapter_values,
                                      const std::optional<Tensor>& gamma, const std::optional<Tensor>& cause_bits,
                                      const std::optional<Tensor>& cause_count, double scale, bool causal,
                                      int64_t xg_tokens);

std::vector<Tensor> attention_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, const std::optional<Tensor>& grad_lse,
                                       const std::optional<Tensor>& mass, const std::optional<Tensor>& grad_mass,
                                       const std::optional<Tensor>& cause_bits,
                                       const std::optional<Tensor>& adapter_keys,
                                       const std::optional<Tensor>& adapter_values, const std::optional<Tensor>& gamma,
                                       const std::optional<Tensor>& grad_xg, double scale, bool causal);

}  // namespace causalattn_native

TORCH_LIBRARY(causalattn_native, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? adapter_keys, Tensor? adapter_values, Tensor? gamma, "
        "Tensor? cause_bits, Tensor? cause_count, float scale, bool causal, int xg_tokens) -> Tensor[]",
        &causalattn_native::attention_forward);
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
        "Tensor? mass, Tensor? grad_mass, Tensor? cause_bits, Tensor? adapter_keys, Tensor? adapter_values, "
        "Tensor? gamma, Tensor? grad_xg, float scale, bool causal) -> Tensor[]",
        &causalattn_native::attention_backward);
}
