// The forward pass of the fused CPU attention: out, lse, the CAT mass and the adapter's XG
// probabilities in one parallel region (docs/native.md).
//
// Shapes: q (B, Hq, Nq, d), k and v (B, Hkv, Nk, d) fp32, bf16 or fp16, last dim contiguous.
//   adapter keys/values (1 or B, Hkv, M, d) fp32 contiguous, gamma (1 or B, Hq) fp32 (optional, together)
//   cause bits (B, Nq, W) int32 and cause count (B, Nq) int32 (optional, together)
// Returns out (B, Hq, Nq, d) in q's dtype; fp32 lse (B, Hq, Nq), mass (B, Hq, Nq) or an empty tensor,
// the adapter probabilities of the first `xg_tokens` slots (B, Hq, Nq, xg_tokens) or an empty tensor.
//
// One work item is one query block of one (batch, head): FlashAttention-2's online softmax over the
// key blocks (two gemms per block), the mass as one more accumulator rescaled like the denominator,
// then the adapter's own softmax over its M <= 64 slots (two small gemms) and the gated read-out.
#include "attention.h"
#include "blocks.h"

#include <ATen/ops/empty.h>

namespace causalattn_native {

namespace {

// out rows += gamma softmax(scale Q Ka^T) Va for one query block; the first xg_tokens probabilities
// of each row go to `xg` (row stride xg_tokens). `scores` holds rows x slots.
void adapter_block(const Adapter& a, int64_t b, int64_t h, int64_t hk, const float* q,
                   int64_t q_ld, int64_t rows, int64_t dim, float scale, float* scores, float* read,
                   float* out, float* xg, int64_t xg_tokens) {
  const int64_t m = a.slots;
  const float* keys = a.keys + b * a.batch_stride + hk * a.head_stride;
  const float* values = a.values + b * a.batch_stride + hk * a.head_stride;
  const float gamma = a.gamma[b * a.gamma_batch_stride + h];
  gemm(false, true, rows, m, dim, scale, q, q_ld, keys, dim, 0.f, scores, m);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * m;
    const float mx = *std::max_element(row, row + m);
    const float inv = 1.f / exp_and_sum(row, m, mx);
    scale_row(row, m, inv);
    if (xg_tokens) std::copy(row, row + xg_tokens, xg + r * xg_tokens);
  }
  gemm(false, false, rows, dim, m, 1.f, scores, m, values, dim, 0.f, read, dim);
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::map2([gamma](Vec o, Vec x) { return o + Vec(gamma) * x; }, out + r * dim, out + r * dim,
                  read + r * dim, dim);
  }
}

template <typename T, typename G>
void forward_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& adapter_keys,
                    const std::optional<Tensor>& adapter_values, const std::optional<Tensor>& gamma,
                    const std::optional<Tensor>& cause_bits, const std::optional<Tensor>& cause_count, double scale,
                    bool causal, int64_t xg_tokens, Tensor& out, Tensor& lse, Tensor& mass, Tensor& xg) {
  const int64_t batch = q.size(0), heads_q = q.size(1), n_q = q.size(2), dim = q.size(3);
  const int64_t heads_kv = k.size(1), n_k = k.size(2), group = heads_q / heads_kv;
  const int64_t offset = n_k - n_q;  // causal, bottom-right aligned: row i sees keys j <= i + offset
  const bool with_mass = cause_bits.has_value(), with_adapter = adapter_keys.has_value();

  const Adapter adapter = with_adapter ? adapter_view(*adapter_keys, *adapter_values, *gamma) : Adapter{};
  const int32_t* bits = with_mass ? cause_bits->data_ptr<int32_t>() : nullptr;
  const int32_t* counts = with_mass ? cause_count->data_ptr<int32_t>() : nullptr;
  const int64_t words = with_mass ? cause_bits->size(2) : 0;

  const Strides qs(q), ks(k), vs(v);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  float* mp = with_mass ? mass.data_ptr<float>() : nullptr;
  float* xp = xg_tokens ? xg.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scale);
  const int64_t blocks = (n_q + BLOCK_Q - 1) / BLOCK_Q, pairs = batch * heads_q;

  at::parallel_for(0, blocks * pairs, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: scores (BLOCK_Q x BLOCK_K), the output accumulator and the row statistics.
    std::vector<float> scores(BLOCK_Q * std::max<int64_t>(BLOCK_K, adapter.slots)), acc(BLOCK_Q * dim);
    std::vector<float> read(with_adapter ? BLOCK_Q * dim : 0), row_max(BLOCK_Q), row_sum(BLOCK_Q), cause(BLOCK_Q);
    constexpr bool convert = !std::is_same_v<T, G>, rounds = !std::is_same_v<G, float>;  // see gemm.h
    std::vector<G> q_rows(convert ? BLOCK_Q * dim : 0), k_rows(convert ? BLOCK_K * dim : 0);
    std::vector<G> v_rows(convert ? BLOCK_K * dim : 0), probs(rounds ? BLOCK_Q * BLOCK_K : 0);
    std::vector<float> q_float(rounds && with_adapter ? BLOCK_Q * dim : 0);  // the adapter's products are fp32
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item % pairs, block = zigzag_block(item / pairs, blocks);
      const int64_t b = bh / heads_q, h = bh % heads_q, hk = h / group;
      const int64_t row0 = block * BLOCK_Q, rows = std::min(BLOCK_Q, n_q - row0);
      const Rows<G> qb = operand<G>(qp + qs.at(b, h, row0), qs.row, rows, dim, q_rows.data());
      const int64_t key_end = causal ? std::min(n_k, row0 + rows + offset) : n_k;
      fill(acc.data(), rows * dim, 0.f);
      fill(row_max.data(), rows, NEG_INF);
      fill(row_sum.data(), rows, 0.f);
      fill(cause.data(), rows, 0.f);
      for (int64_t key0 = 0; key0 < key_end; key0 += BLOCK_K) {
        const int64_t cols = std::min(BLOCK_K, key_end - key0);
        const Rows<G> kb = operand<G>(kp + ks.at(b, hk, key0), ks.row, cols, dim, k_rows.data());
        const Rows<G> vb = operand<G>(vp + vs.at(b, hk, key0), vs.row, cols, dim, v_rows.data());
        gemm(false, true, rows, cols, dim, 1.f, qb.data, qb.ld, kb.data, kb.ld, 0.f, scores.data(), cols);
        for (int64_t r = 0; r < rows; ++r) {
          float* p = scores.data() + r * cols;
          const int64_t seen = visible_count(causal, row0 + r, offset, key0, cols);
          const float block_max = scale_and_max(p, seen, s);
          const float mx = std::max(row_max[r], block_max);
          // Every row sees key 0 in the first block, so mx is finite from there on (no inf - inf) unless
          // a score is +inf or NaN: such a row is NaN, out and lse, as in a plain softmax (docs/errors.md).
          // exp_u20 clamps NaN to a finite value, so the row is marked through its sum.
          const float alpha = std::exp(row_max[r] - mx);
          const float sum = exp_and_sum(p, seen, mx);
          fill(p + seen, cols - seen, 0.f);
          row_sum[r] = block_max < INF ? row_sum[r] * alpha + sum : std::numeric_limits<float>::quiet_NaN();
          row_max[r] = mx;
          if (alpha != 1.f) scale_row(acc.data() + r * dim, dim, alpha);
          if (with_mass && counts[b * n_q + row0 + r] > 0) {
            cause[r] = cause[r] * alpha + cause_sum(bits + (b * n_q + row0 + r) * words, p, key0, key0 + seen);
          }
        }
        const G* weights = rounded<G>(scores.data(), rows, cols, probs.data());
        gemm(false, false, rows, dim, cols, 1.f, weights, cols, vb.data, vb.ld, 1.f, acc.data(), dim);
      }
      const int64_t stat = (b * heads_q + h) * n_q + row0;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / row_sum[r];
        scale_row(acc.data() + r * dim, dim, inv);
        lp[stat + r] = row_max[r] + std::log(row_sum[r]);
        if (with_mass) mp[stat + r] = cause[r] * inv;
      }
      if (with_adapter) {
        const Rows<float> qf = rounds ? operand<float>(qp + qs.at(b, h, row0), qs.row, rows, dim, q_float.data())
                                      : Rows<float>{reinterpret_cast<const float*>(qb.data), qb.ld};
        adapter_block(adapter, b, h, hk, qf.data, qf.ld, rows, dim, s, scores.data(), read.data(), acc.data(),
                      xp ? xp + stat * xg_tokens : nullptr, xg_tokens);
      }
      store_rows(acc.data(), op + stat * dim, dim, rows, dim);
    }
  });
}

}  // namespace

std::vector<Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const std::optional<Tensor>& adapter_keys,
                                      const std::optional<Tensor>& adapter_values,
                                      const std::optional<Tensor>& gamma, const std::optional<Tensor>& cause_bits,
                                      const std::optional<Tensor>& cause_count, double scale, bool causal,
                                      int64_t xg_tokens) {
  const int64_t batch = q.size(0), heads_q = q.size(1), n_q = q.size(2);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor out = at::empty({batch, heads_q, n_q, q.size(3)}, q.options());
  Tensor lse = at::empty({batch, heads_q, n_q}, f32);
  Tensor mass = at::empty({cause_bits.has_value() ? batch : 0, heads_q, n_q}, f32);
  Tensor xg = at::empty({xg_tokens ? batch : 0, heads_q, n_q, xg_tokens}, f32);
  const auto run = [&](auto input, auto operand_type) {
    forward_kernel<decltype(input), decltype(operand_type)>(q, k, v, adapter_keys, adapter_values, gamma, cause_bits,
                                                            cause_count, scale,
                                   causal, xg_tokens, out, lse, mass, xg);
  };
  dispatch_dtype(q.scalar_type(), "forward", run);
  return {out, lse, mass, xg};
}

}  // namespace causalattn_native
