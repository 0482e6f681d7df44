// Registers the fused CPU attention passes as torch operators (torch.ops.causalattn_native.*): schema
// checked calls with no pybind11 module, so this file compiles against the light torch/library.h.
#include "attention.h"

#include <torch/library.h>

TORCH_LIBRARY(causalattn_native, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? adapter_keys, Tensor? adapter_values, Tensor? gamma, "
        "Tensor? cause_bits, Tensor? cause_count, float scale, bool causal, int xg_tokens) -> Tensor[]",
        &causalattn_native::attention_forward);
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
        "Tensor? mass, Tensor? grad_mass, Tensor? cause_bits, Tensor? adapter_keys, Tensor? adapter_values, "
        "Tensor? gamma, Tensor? grad_xg, float scale, bool causal) -> Tensor[]",
        &causalattn_native::attention_backward);
}
