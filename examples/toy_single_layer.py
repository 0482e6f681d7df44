"""A toy single-layer model trained with CE + CAT + XG through the fused op (CPU or GPU).

Task: each sequence holds one "cause" token (from the upper half of the vocabulary) at a random
position among filler tokens (lower half); the last position must copy it. The CausalMask tells CAT
where the cause is, so the CAT loss pulls the attention of the answer-predicting row onto it.
"""
import torch

import causalattn

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
batch, seq_len, width, heads, kv_heads, head_dim, prompt_len, vocab = 16, 48, 64, 4, 2, 16, 8, 32

layer = torch.nn.ModuleDict(dict(
    embed=torch.nn.Embedding(vocab, width), q=torch.nn.Linear(width, heads * head_dim),
    k=torch.nn.Linear(width, kv_heads * head_dim), v=torch.nn.Linear(width, kv_heads * head_dim),
    o=torch.nn.Linear(heads * head_dim, width), head=torch.nn.Linear(width, vocab))).to(device)
prompt = torch.nn.Parameter(torch.randn(prompt_len, width, device=device))  # the adapter
gate = torch.nn.Parameter(torch.zeros(heads, device=device))  # zero-init: the adapter starts silent
optimizer = torch.optim.AdamW([*layer.parameters(), prompt, gate], lr=3e-3)


def batch_of_copies():
    tokens = torch.randint(0, vocab // 2, (batch, seq_len), device=device)
    cause = torch.randint(0, seq_len - 2, (batch,)).tolist()
    tokens[torch.arange(batch), cause] = torch.randint(vocab // 2, vocab, (batch,), device=device)
    tokens[:, -1] = tokens[torch.arange(batch), cause]
    spans = [[((seq_len - 1, seq_len), [(c, c + 1)])] for c in cause]  # effect: last token; cause: the hidden one
    return tokens, causalattn.CausalMask.from_spans(spans, seq_len, device=device)


def split_heads(x, n):  # (B, N, n*d) -> (B, n, N, d)
    return x.view(batch, -1, n, head_dim).transpose(1, 2)


for step in range(301):
    tokens, mask = batch_of_copies()
    hidden = layer["embed"](tokens)
    q, k, v = (split_heads(layer[name](hidden), n) for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)))
    adapter = causalattn.Adapter(layer["k"](prompt).view(prompt_len, kv_heads, head_dim).transpose(0, 1),
                                 layer["v"](prompt).view(prompt_len, kv_heads, head_dim).transpose(0, 1), gate)
    res = causalattn.attention(q, k, v, adapter=adapter, supervision=mask, xg_tokens=2)
    logits = layer["head"](layer["o"](res.out.transpose(1, 2).reshape(batch, seq_len, -1)))
    ce = torch.nn.functional.cross_entropy(logits[:, -2], tokens[:, -1])
    cat = causalattn.cat_loss(res.mass, mask)
    xg = causalattn.xg_variance(res.xg, layer["o"].weight)
    loss = ce + causalattn.cat_amp(step / 100) * cat + 0.1 * xg
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        on_cause = res.mass[:, :, -2].mean().item()
        accuracy = (logits[:, -2].argmax(-1) == tokens[:, -1]).float().mean().item()
        print(f"step {step:3d}  CE {ce.item():.3f}  CAT {cat.item():+.3f}  XG {xg.item():.2e}  "
              f"attention on cause {on_cause:.2f}  copy accuracy {accuracy:.2f}")
