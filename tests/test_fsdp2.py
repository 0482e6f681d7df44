"""FSDP2 on CPUs (torch's `fully_shard`, gloo, 2 processes): the adapters train through the sharded layers
and are saved from the gathered state dict, the same as without sharding. Accelerate does not apply its
FSDP plugin to CPU runs (tests/test_accelerate.py), so this launches torch's own launcher; on GPUs the
Accelerate config is examples/accelerate/fsdp2.yaml."""
import sys

import torch
from safetensors.torch import load_file

import causalattn.hf as cah
from hf_helpers import build, llama_config, padded_batch
from launch_helpers import ROOT, free_port, run_workers


def train(shard=None, steps=3):
    """The run both sides make: a tiny adapted LLaMA (optionally sharded), AdamW on CE + XG, one batch."""
    model = build(llama_config(), dtype=torch.float32)
    torch.manual_seed(0)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2, xg_tokens=2))
    if shard is not None:
        shard(model)
    ids, mask = padded_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        with cah.collect(model) as stats:
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        optimizer.zero_grad()
        (out.loss + stats.xg_loss()).backward()
        optimizer.step()
    return model


def test_fsdp2_shards_train_and_save_the_unsharded_adapters(tmp_path, single_thread):
    run_workers([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(free_port()), str(ROOT / "tests" / "fsdp2_worker.py"), str(tmp_path / "sharded")])
    sharded = load_file(str(tmp_path / "sharded" / "adapter_model.safetensors"))
    unsharded = load_file(str(cah.save_adapters(train(), tmp_path / "unsharded") / "adapter_model.safetensors"))
    assert sharded.keys() == unsharded.keys()
    for name in unsharded:
        torch.testing.assert_close(sharded[name], unsharded[name], rtol=1e-5, atol=1e-6)
    assert any(bool(t.abs().max() > 0) for n, t in unsharded.items() if n.endswith("gate"))
