"""One process of tests/test_fsdp2.py (started by torchrun): the adapted tiny LLaMA sharded with FSDP2
(`fully_shard` per decoder layer, then the root), a few AdamW steps of CE + XG on the same batch on every
rank, the adapters saved by rank 0 from the gathered full state dict, as the Trainer does under FSDP."""
import os
import sys

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

import causalattn.hf as cah
from test_fsdp2 import train


def main(output: str) -> None:
    dist.init_process_group("gloo")
    model = train(shard=lambda m: [fully_shard(layer) for layer in m.model.layers] and fully_shard(m))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        cah.save_adapters(model, output, state_dict=full)
    dist.barrier()  # both ranks tear gloo down together: none closes its pairs while the other still works
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in CI a rank aborted with "terminate called without an
    # active exception", the mark of a C++ thread (here most likely gloo's) still running while the static
    # destructors run at exit; 30 local runs under a competing load never repeated it. Everything the test
    # reads is written and closed above; an error before this line still fails the launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
