// The backward pass of the fused CPU attention, every gradient in one parallel region (docs/native.md).
//
// Shapes: q, out, grad_out (B, Hq, Nq, d) and k, v (B, Hkv, Nk, d) in one dtype (fp32, bf16, fp16);
//   fp32 lse, mass and their gradients (B, Hq, Nq), grad_xg (B, Hq, Nq, xg_tokens), adapter
//   keys/values (1 or B, Hkv, M, d), gamma (1 or B, Hq); the last dim contiguous. Optional: the lse,
//   mass and XG gradients, the adapter, the cause bits.
// Returns dq (B, Hq, Nq, d), dk, dv (B, Hkv, Nk, d) in the inputs' dtype (dK and dV accumulate in fp32
// per query head, then each group is summed); the adapter's per-(batch, query head) partials d_keys
// and d_values (B, Hq, M, d) and d_gamma (B, Hq) (the caller sums them over the group and a shared
// prompt's batch).
//
// The score gradient of FlashAttention-2, dS_ij = P_ij (dP_ij - D_i), with every statistic folded into
// the row term and one cause term (docs/math.md §1, §2, §4):
//   D_i   = dO_i . O_i - gamma dO_i . O^a_i + c_i m_i - dlse_i      c = dL/dm
//   dS_ij = P_ij (dP_ij - D_i) + c_i P_ij A_ij
// One work item is one (batch, query head): it owns that head's dK and dV, so no two threads write the
// same row (PyTorch's CPU flash backward splits the same way).
#include "attention.h"
#include "blocks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

namespace causalattn_native {

namespace {

struct AdapterGrad : Adapter {
  float* d_keys = nullptr;    // (B, Hq, M, d)
  float* d_values = nullptr;  // (B, Hq, M, d)
  float* d_gamma = nullptr;   // (B, Hq)
  const float* grad_xg = nullptr;  // (B, Hq, Nq, xg_tokens) or null
  int64_t xg_tokens = 0;
};

struct Scratch {
  std::vector<float> scores, grad, dq, adapter_probs, adapter_grad;
};

// The adapter's part of one query block: its gradients (accumulated into the item's partials), the
// adapter's share of dQ (which initialises `dq`), and gamma dO_i . O^a_i per row into `adapter_row`.
void adapter_block_backward(const AdapterGrad& a, int64_t b, int64_t h, int64_t hk, int64_t item, const float* q,
                            int64_t q_ld, const float* d_out, int64_t do_ld, int64_t rows, int64_t dim, float scale,
                            const float* grad_xg, Scratch& t, float* adapter_row) {
  const int64_t m = a.slots;
  const float* keys = a.keys + b * a.batch_stride + hk * a.head_stride;
  const float* values = a.values + b * a.batch_stride + hk * a.head_stride;
  const float gamma = a.gamma[b * a.gamma_batch_stride + h];
  float* probs = t.adapter_probs.data();
  float* grad = t.adapter_grad.data();
  gemm(false, true, rows, m, dim, scale, q, q_ld, keys, dim, 0.f, probs, m);
  gemm(false, true, rows, m, dim, 1.f, d_out, do_ld, values, dim, 0.f, grad, m);  // e_im = dO_i . va_m
  float gate_grad = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    float* p = probs + r * m;
    float* e = grad + r * m;
    const float mx = *std::max_element(p, p + m);
    scale_row(p, m, 1.f / exp_and_sum(p, m, mx));
    const float read = dot(p, e, m);  // dO_i . O^a_i
    gate_grad += read;
    adapter_row[r] = gamma * read;
    scale_row(e, m, gamma);  // dPa_im = gamma e_im (+ the XG gradient on the first slots)
    if (grad_xg) {
      for (int64_t x = 0; x < a.xg_tokens; ++x) e[x] += grad_xg[r * a.xg_tokens + x];
    }
    const float da = dot(p, e, m);
    for (int64_t x = 0; x < m; ++x) e[x] = p[x] * (e[x] - da);  // dT_im = Pa_im (dPa_im - Da_i)
  }
  a.d_gamma[item] += gate_grad;
  float* d_keys = a.d_keys + item * m * dim;
  float* d_values = a.d_values + item * m * dim;
  gemm(false, false, rows, dim, m, scale, grad, m, keys, dim, 0.f, t.dq.data(), dim);     // dq = tau dT Ka
  gemm(true, false, m, dim, rows, scale, grad, m, q, q_ld, 1.f, d_keys, dim);             // dKa += tau dT^T Q
  gemm(true, false, m, dim, rows, gamma, probs, m, d_out, do_ld, 1.f, d_values, dim);     // dVa += gamma Pa^T dO
}

template <typename T, typename G>
void backward_kernel(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                     const Tensor& lse, const std::optional<Tensor>& grad_lse, const std::optional<Tensor>& mass,
                     const std::optional<Tensor>& grad_mass, const std::optional<Tensor>& cause_bits,
                     const std::optional<Tensor>& adapter_keys, const std::optional<Tensor>& adapter_values,
                     const std::optional<Tensor>& gamma, const std::optional<Tensor>& grad_xg, double scale,
                     bool causal, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_keys, Tensor& d_values,
                     Tensor& d_gamma) {
  const int64_t batch = q.size(0), heads_q = q.size(1), n_q = q.size(2), dim = q.size(3);
  const int64_t heads_kv = k.size(1), n_k = k.size(2), group = heads_q / heads_kv;
  const int64_t offset = n_k - n_q;
  const bool with_adapter = adapter_keys.has_value();
  const int64_t slots = with_adapter ? adapter_keys->size(2) : 0;

  AdapterGrad adapter;
  if (with_adapter) {
    static_cast<Adapter&>(adapter) = adapter_view(*adapter_keys, *adapter_values, *gamma);
    adapter.d_keys = d_keys.data_ptr<float>();
    adapter.d_values = d_values.data_ptr<float>();
    adapter.d_gamma = d_gamma.data_ptr<float>();
    adapter.grad_xg = grad_xg ? grad_xg->data_ptr<float>() : nullptr;
    adapter.xg_tokens = grad_xg ? grad_xg->size(3) : 0;
  }
  const float* g_lse = grad_lse ? grad_lse->data_ptr<float>() : nullptr;
  const bool with_mass = grad_mass.has_value();
  const float* m_ptr = with_mass ? mass->data_ptr<float>() : nullptr;
  const float* g_mass = with_mass ? grad_mass->data_ptr<float>() : nullptr;
  const int32_t* bits = with_mass ? cause_bits->data_ptr<int32_t>() : nullptr;
  const int64_t words = with_mass ? cause_bits->size(2) : 0;

  const Strides qs(q), ks(k), vs(v), os(out), gs(grad_out);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *opt = out.data_ptr<T>(), *gp = grad_out.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t blocks = (n_q + BLOCK_Q - 1) / BLOCK_Q;

  at::parallel_for(0, batch * heads_q, 1, [&](int64_t begin, int64_t end) {
    Scratch t{std::vector<float>(BLOCK_Q * BLOCK_K), std::vector<float>(BLOCK_Q * BLOCK_K),
              std::vector<float>(BLOCK_Q * dim), std::vector<float>(BLOCK_Q * slots),
              std::vector<float>(BLOCK_Q * slots)};
    std::vector<float> row_term(BLOCK_Q), adapter_row(BLOCK_Q), cause_grad(BLOCK_Q);
    constexpr bool convert = !std::is_same_v<T, G>, rounds = !std::is_same_v<G, float>;  // see gemm.h
    constexpr bool to_float = !std::is_same_v<T, float>;
    std::vector<G> q_rows(convert ? BLOCK_Q * dim : 0), g_rows(convert ? BLOCK_Q * dim : 0);
    std::vector<G> k_rows(convert ? BLOCK_K * dim : 0), v_rows(convert ? BLOCK_K * dim : 0);
    std::vector<G> probs(rounds ? BLOCK_Q * BLOCK_K : 0), grads(rounds ? BLOCK_Q * BLOCK_K : 0);
    // fp32 rows for the row terms and the adapter (its products are fp32)
    std::vector<float> q_float(rounds && with_adapter ? BLOCK_Q * dim : 0), g_float(rounds ? BLOCK_Q * dim : 0);
    std::vector<float> o_float(to_float ? BLOCK_Q * dim : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads_q, h = item % heads_q, hk = h / group;
      float* dk_head = dkp + item * n_k * dim;
      float* dv_head = dvp + item * n_k * dim;
      fill(dk_head, n_k * dim, 0.f);
      fill(dv_head, n_k * dim, 0.f);
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t row0 = block * BLOCK_Q, rows = std::min(BLOCK_Q, n_q - row0);
        const Rows<G> qb = operand<G>(qp + qs.at(b, h, row0), qs.row, rows, dim, q_rows.data());
        const Rows<G> gb = operand<G>(gp + gs.at(b, h, row0), gs.row, rows, dim, g_rows.data());
        const Rows<float> gf = rounds ? operand<float>(gp + gs.at(b, h, row0), gs.row, rows, dim, g_float.data())
                                      : Rows<float>{reinterpret_cast<const float*>(gb.data), gb.ld};
        const Rows<float> ob = operand<float>(opt + os.at(b, h, row0), os.row, rows, dim, o_float.data());
        const int64_t stat = item * n_q + row0;
        fill(adapter_row.data(), rows, 0.f);
        if (with_adapter) {
          const Rows<float> qf = rounds ? operand<float>(qp + qs.at(b, h, row0), qs.row, rows, dim, q_float.data())
                                        : Rows<float>{reinterpret_cast<const float*>(qb.data), qb.ld};
          adapter_block_backward(adapter, b, h, hk, item, qf.data, qf.ld, gf.data, gf.ld, rows, dim, s,
                                 adapter.grad_xg ? adapter.grad_xg + stat * adapter.xg_tokens : nullptr, t,
                                 adapter_row.data());
        } else {
          fill(t.dq.data(), rows * dim, 0.f);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float d = dot(gf.data + r * gf.ld, ob.data + r * ob.ld, dim) - adapter_row[r];
          cause_grad[r] = with_mass ? g_mass[stat + r] : 0.f;
          if (with_mass) d += cause_grad[r] * m_ptr[stat + r];
          if (g_lse) d -= g_lse[stat + r];
          // A NaN row (an infinite or NaN score, see forward.cpp) passes NaN on, as a plain softmax would:
          // exp_u20 would turn its NaN lse into finite probabilities.
          row_term[r] = std::isnan(lp[stat + r]) ? lp[stat + r] : d;
        }
        const int64_t key_end = causal ? std::min(n_k, row0 + rows + offset) : n_k;
        for (int64_t key0 = 0; key0 < key_end; key0 += BLOCK_K) {
          const int64_t cols = std::min(BLOCK_K, key_end - key0);
          const Rows<G> kb = operand<G>(kp + ks.at(b, hk, key0), ks.row, cols, dim, k_rows.data());
          const Rows<G> vb = operand<G>(vp + vs.at(b, hk, key0), vs.row, cols, dim, v_rows.data());
          float* p = t.scores.data();
          float* ds = t.grad.data();
          gemm(false, true, rows, cols, dim, 1.f, qb.data, qb.ld, kb.data, kb.ld, 0.f, p, cols);
          gemm(false, true, rows, cols, dim, 1.f, gb.data, gb.ld, vb.data, vb.ld, 0.f, ds, cols);  // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t seen = visible_count(causal, row0 + r, offset, key0, cols);
            float* pr = p + r * cols;
            float* dr = ds + r * cols;
            scaled_exp(pr, seen, s, lp[stat + r]);
            fill(pr + seen, cols - seen, 0.f);
            const float d = row_term[r];
            at::vec::map2([d](Vec pv, Vec gv) { return pv * (gv - Vec(d)); }, dr, pr, dr, seen);
            fill(dr + seen, cols - seen, 0.f);
            if (cause_grad[r] != 0.f) {
              add_cause_term(bits + (b * n_q + row0 + r) * words, pr, dr, cause_grad[r], key0, key0 + seen);
            }
          }
          const G* pg = rounded<G>(p, rows, cols, probs.data());
          const G* dsg = rounded<G>(ds, rows, cols, grads.data());
          // dV += P^T dO, dQ += tau dS K, dK += tau dS^T Q
          gemm(true, false, cols, dim, rows, 1.f, pg, cols, gb.data, gb.ld, 1.f, dv_head + key0 * dim, dim);
          gemm(false, false, rows, dim, cols, s, dsg, cols, kb.data, kb.ld, 1.f, t.dq.data(), dim);
          gemm(true, false, cols, dim, rows, s, dsg, cols, qb.data, qb.ld, 1.f, dk_head + key0 * dim, dim);
        }
        store_rows(t.dq.data(), dqp + stat * dim, dim, rows, dim);
      }
    }
  });
}

}  // namespace

std::vector<Tensor> attention_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, const std::optional<Tensor>& grad_lse,
                                       const std::optional<Tensor>& mass, const std::optional<Tensor>& grad_mass,
                                       const std::optional<Tensor>& cause_bits,
                                       const std::optional<Tensor>& adapter_keys,
                                       const std::optional<Tensor>& adapter_values, const std::optional<Tensor>& gamma,
                                       const std::optional<Tensor>& grad_xg, double scale, bool causal) {
  const int64_t batch = q.size(0), heads_q = q.size(1), n_q = q.size(2), dim = q.size(3);
  const int64_t heads_kv = k.size(1), n_k = k.size(2), group = heads_q / heads_kv;
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor dq = at::empty({batch, heads_q, n_q, dim}, q.options());
  Tensor dk = at::empty({batch, heads_q, n_k, dim}, f32);  // per query head, fp32: the group is summed below
  Tensor dv = at::empty({batch, heads_q, n_k, dim}, f32);
  const int64_t adapter_batch = adapter_keys.has_value() ? batch : 0;
  const int64_t slots = adapter_keys.has_value() ? adapter_keys->size(2) : 0;
  Tensor d_keys = at::zeros({adapter_batch, heads_q, slots, dim}, f32);
  Tensor d_values = at::zeros({adapter_batch, heads_q, slots, dim}, f32);
  Tensor d_gamma = at::zeros({adapter_batch, heads_q}, f32);
  const auto run = [&](auto input, auto operand_type) {
    backward_kernel<decltype(input), decltype(operand_type)>(grad_out, q, k, v, out, lse, grad_lse, mass, grad_mass,
                                                             cause_bits, adapter_keys,
                                    adapter_values, gamma, grad_xg, scale, causal, dq, dk, dv, d_keys, d_values,
                                    d_gamma);
  };
  dispatch_dtype(q.scalar_type(), "backward", run);
  if (group > 1) {
    dk = dk.view({batch, heads_kv, group, n_k, dim}).sum(2);
    dv = dv.view({batch, heads_kv, group, n_k, dim}).sum(2);
  }
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type()), d_keys, d_values, d_gamma};
}

}  // namespace causalattn_native
