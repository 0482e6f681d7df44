// Shared pieces of the fused CPU attention kernel (forward.cpp, backward.cpp).
//
// Shapes (row-major; the last dim of every tensor is contiguous, the others may be strided):
//   q (B, Hq, Nq, d), k and v (B, Hkv, Nk, d) fp32, bf16 or fp16, Hq = G * Hkv (query head h reads KV head h / G)
//   adapter keys/values (1 or B, Hkv, M, d) fp32 contiguous, gamma (1 or B, Hq) fp32
//   cause bits (B, Nq, W) int32, W = ceil(Nk / 32); cause count (B, Nq) int32
// A block is BLOCK_Q query rows against BLOCK_K keys; both are multiples of 32 so that a key block
// starts on a word boundary of the cause bits.
#pragma once

#include "gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace causalattn_native {

using at::Tensor;

// Query rows x keys per block. 128 x 512 fp32 scores are 256 KB (the backward holds two such blocks
// and the fp32 key and value blocks, 128 KB each at d = 64): all of it stays in a 2 MB L2. Paired
// against SDPA (fwd+bwd, N = 4096, 8 heads, d = 64, 2 threads): 0.85x with 128 or 256 rows, 0.91x
// with 64, 0.97x with 32; 256 keys per block instead of 512: 0.88x at 64 rows (docs/native.md).
constexpr int64_t BLOCK_Q = 128;
constexpr int64_t BLOCK_K = 512;
constexpr float INF = std::numeric_limits<float>::infinity(), NEG_INF = -INF;

// Strides of a 4-D (batch, head, row, col) tensor, in elements; the last dim is contiguous.
struct Strides {
  int64_t batch, head, row;
  explicit Strides(const Tensor& t) : batch(t.size(0) > 1 ? t.stride(0) : 0), head(t.stride(1)), row(t.stride(2)) {}
  int64_t at(int64_t b, int64_t h, int64_t i) const { return b * batch + h * head + i * row; }
};

// The helpers below end each row with one masked vector op instead of a scalar loop: the adapter's
// rows are M = 10 slots long (all tail at 16 lanes), and a causal diagonal block ends every row at
// another column. Lanes past n are loaded as 0 and blended out of every reduction.

// x[0:n] *= s, returns max(x[0:n]) (-inf for n = 0).
inline float scale_and_max(float* x, int64_t n, float s) {
  Vec vmax(NEG_INF), vs(s);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(x + j) * vs;
    v.store(x + j);
    vmax = at::vec::maximum(vmax, v);
  }
  if (j < n) {
    const int rest = static_cast<int>(n - j);
    Vec v = Vec::loadu(x + j, rest) * vs;
    v.store(x + j, rest);
    vmax = at::vec::maximum(vmax, Vec::set(Vec(NEG_INF), v, rest));
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// x[0:n] = exp(x[0:n] - shift), returns their sum.
inline float exp_and_sum(float* x, int64_t n, float shift) {
  Vec vsum(0.f), vshift(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = (Vec::loadu(x + j) - vshift).exp_u20();
    v.store(x + j);
    vsum = vsum + v;
  }
  if (j < n) {
    const int rest = static_cast<int>(n - j);
    Vec v = (Vec::loadu(x + j, rest) - vshift).exp_u20();
    v.store(x + j, rest);
    vsum = vsum + Vec::set(Vec(0.f), v, rest);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

// x[0:n] = exp(x[0:n] * s - shift): the backward's recomputed probabilities from the saved lse.
inline void scaled_exp(float* x, int64_t n, float s, float shift) {
  Vec vs(s), vshift(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * vs - vshift).exp_u20().store(x + j);
  if (j < n) {
    const int rest = static_cast<int>(n - j);
    (Vec::loadu(x + j, rest) * vs - vshift).exp_u20().store(x + j, rest);
  }
}

inline void scale_row(float* x, int64_t n, float s) {
  at::vec::map([s](Vec v) { return v * Vec(s); }, x, x, n);
}

inline void fill(float* x, int64_t n, float value) { std::fill(x, x + n, value); }

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  if (j < n) {
    const int rest = static_cast<int>(n - j);
    acc = at::vec::fmadd(Vec::loadu(a + j, rest), Vec::loadu(b + j, rest), acc);  // zero lanes add 0
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
}

// Sum of p[j - key0] over the cause keys j in [key0, key_end) of one row's bit words (key0 % 32 == 0).
inline float cause_sum(const int32_t* words, const float* p, int64_t key0, int64_t key_end) {
  float sum = 0.f;
  for (int64_t w = key0 / 32; w * 32 < key_end; ++w) {
    uint32_t bits = static_cast<uint32_t>(words[w]);
    while (bits) {
      sum += p[w * 32 + __builtin_ctz(bits) - key0];
      bits &= bits - 1;
    }
  }
  return sum;
}

// grad[j - key0] += c prob[j - key0] for the cause keys j in [key0, key_end): the score gradient's
// cause term c_i P_ij A_ij of the mass (docs/math.md §2).
inline void add_cause_term(const int32_t* words, const float* prob, float* grad, float c, int64_t key0,
                           int64_t key_end) {
  for (int64_t w = key0 / 32; w * 32 < key_end; ++w) {
    uint32_t bits = static_cast<uint32_t>(words[w]);
    while (bits) {
      const int64_t j = w * 32 + __builtin_ctz(bits) - key0;
      grad[j] += c * prob[j];
      bits &= bits - 1;
    }
  }
}

// Rows of a query block that see keys of [key0, key0 + cols): how many of them, causal bottom-right.
inline int64_t visible_count(bool causal, int64_t row, int64_t offset, int64_t key0, int64_t cols) {
  if (!causal) return cols;
  return std::clamp<int64_t>(row + offset - key0 + 1, 0, cols);
}

// Calls run(input, operand) with the input's element type and the block products' operand type: the
// 16-bit type itself where MKL's 16-bit gemm is exported, else float (blocks converted as they are read).
template <typename Run>
void dispatch_dtype(at::ScalarType dtype, const char* pass, const Run& run) {
  switch (dtype) {
    case at::kFloat: run(float{}, float{}); break;
    case at::kBFloat16:
      low_precision_gemm<at::BFloat16>() ? run(at::BFloat16{}, at::BFloat16{}) : run(at::BFloat16{}, float{});
      break;
    case at::kHalf: low_precision_gemm<at::Half>() ? run(at::Half{}, at::Half{}) : run(at::Half{}, float{}); break;
    default: TORCH_CHECK(false, "causalattn_native.", pass, ": float32, bfloat16 or float16 inputs, got ", dtype);
  }
}

// The gated prompt as the kernels read it: fp32 keys/values (1 or B, Hkv, M, d) and gamma (1 or B, Hq), a
// batch stride of 0 when one prompt serves the whole batch.
struct Adapter {
  const float* keys = nullptr;
  const float* values = nullptr;
  const float* gamma = nullptr;
  int64_t slots = 0, batch_stride = 0, head_stride = 0, gamma_batch_stride = 0;
};

inline Adapter adapter_view(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& gamma) {
  Adapter a;
  a.keys = keys.data_ptr<float>();
  a.values = values.data_ptr<float>();
  a.gamma = gamma.data_ptr<float>();
  a.slots = keys.size(2);
  a.batch_stride = keys.size(0) > 1 ? keys.stride(0) : 0;
  a.head_stride = keys.stride(1);
  a.gamma_batch_stride = gamma.size(0) > 1 ? gamma.stride(0) : 0;
  return a;
}

// Work items (batch x head, query block) ordered so that any contiguous range of them has about the
// same causal work: query blocks go in pairs (first, last), (second, second to last), ..., and a
// pair's cost is constant. at::parallel_for hands each thread one contiguous range.
inline int64_t zigzag_block(int64_t slot, int64_t blocks) {
  return slot % 2 == 0 ? slot / 2 : blocks - 1 - slot / 2;
}

}  // namespace causalattn_native
