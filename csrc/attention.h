// The fused CPU attention kernel's two entry points, declared once for their definitions (forward.cpp,
// backward.cpp) and their registration as torch operators (bindings.cpp).
#pragma once

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
