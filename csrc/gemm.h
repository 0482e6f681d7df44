// Block matrix products of the fused CPU attention kernel: fp32 x fp32 and bf16/fp16 x bf16/fp16 with
// fp32 results, all through the BLAS that libtorch_cpu links and exports (MKL on x86 wheels).
//
// Shapes: every matrix row-major with a leading dimension; C (m x n) = alpha op(A) op(B) + beta C with
// op(A) (m x k), op(B) (k x n), C fp32.
//
// The operand type G of a kernel instance is the input type T when the BLAS has a product for it
// (MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, found at run time: 19 us against sgemm's 56 us
// for a 128 x 512 x 64 block on this Xeon, AMX), else fp32: input blocks are then converted as they are
// read and every product runs in fp32. Probabilities and score gradients (computed in fp32) are rounded
// to G before their products, as FlashAttention does in 16-bit; every accumulator stays fp32.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <dlfcn.h>

#include <cstdint>
#include <type_traits>

// Fortran BLAS, the one PyTorch's own CPU flash kernel reaches through cpublas::gemm (whose typed
// overloads are not exported). Inside the one parallel region it runs single-threaded (MKL sees the
// enclosing OpenMP region).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace causalattn_native {

using Vec = at::vec::Vectorized<float>;

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(X) = X^T when trans_x. Column-major BLAS sees
// every row-major matrix as its transpose, so it computes C^T = op(B)^T op(A)^T: swap the operands.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
}

// MKL's 16-bit products with fp32 results (CBLAS, row-major layout 101, no transpose 111, transpose 112).
using LowPrecisionGemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                  const void* a, int lda, const void* b, int ldb, float beta, float* c, int ldc);

template <typename T>
LowPrecisionGemm low_precision_gemm() {
  static const LowPrecisionGemm found = [] {
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);  // already loaded: this library links it
    const char* name = std::is_same_v<T, c10::BFloat16> ? "cblas_gemm_bf16bf16f32" : "cblas_gemm_f16f16f32";
    return torch_cpu ? reinterpret_cast<LowPrecisionGemm>(dlsym(torch_cpu, name)) : nullptr;
  }();
  return found;
}

template <typename T, std::enable_if_t<!std::is_same_v<T, float>, int> = 0>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  low_precision_gemm<T>()(101, trans_a ? 112 : 111, trans_b ? 112 : 111, static_cast<int>(m), static_cast<int>(n),
                          static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
                          static_cast<int>(ldc));
}

// A block of rows as operands of type G: the rows themselves when the input type T is G (leading
// dimension `ld`), else converted to fp32 into `scratch` (leading dimension `cols`).
template <typename G>
struct Rows {
  const G* data;
  int64_t ld;
};

template <typename G, typename T>
inline Rows<G> operand(const T* src, int64_t ld, int64_t rows, int64_t cols, G* scratch) {
  if constexpr (std::is_same_v<G, T>) {
    return {src, ld};
  } else {
    static_assert(std::is_same_v<G, float>, "16-bit blocks are read as themselves or as fp32");
    using VecT = at::vec::Vectorized<T>;
    for (int64_t r = 0; r < rows; ++r) {
      const T* in = src + r * ld;
      float* out = scratch + r * cols;
      int64_t j = 0;
      for (; j + VecT::size() <= cols; j += VecT::size()) {
        auto [low, high] = at::vec::convert_to_float<T>(VecT::loadu(in + j));
        low.store(out + j);
        high.store(out + j + Vec::size());
      }
      for (; j < cols; ++j) out[j] = static_cast<float>(in[j]);
    }
    return {scratch, cols};
  }
}

// An fp32 block (leading dimension cols) as operands of type G: itself, or rounded into `scratch`.
template <typename G>
inline const G* rounded(const float* src, int64_t rows, int64_t cols, G* scratch) {
  if constexpr (std::is_same_v<G, float>) {
    return src;
  } else {
    at::vec::convert(src, scratch, rows * cols);
    return scratch;
  }
}

// rows x cols fp32 (leading dimension cols) into the output's dtype (leading dimension ld).
template <typename T>
inline void store_rows(const float* src, T* dst, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * cols, dst + r * ld, cols);
}

}  // namespace causalattn_native
