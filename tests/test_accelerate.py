"""`accelerate launch` of a `CausalTrainer` script (examples/accelerate_trainer.py) with 2 CPU processes
(gloo): the same logged losses and the same trained adapters as 1 process with the same global batch
(2 processes x 2 samples against 1 process x 2 samples x 2 accumulation steps), within rounding.

FSDP2 through Accelerate cannot run here: Accelerate (1.16) applies its FSDP plugin only to accelerator
devices; a CPU run (`use_cpu`) is plain multi-CPU DDP whatever the config says. So the config
(examples/accelerate/fsdp2.yaml) is checked as Accelerate reads it, FSDP2 itself runs on CPUs through
torch's launcher (tests/test_fsdp2.py), and what it changes for the Trainer, `_save` handed a gathered
state dict, is tested below.
"""
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import causalattn.hf as cah
from hf_helpers import build, llama_config
from launch_helpers import ROOT, free_port, run_workers
from test_hf_trainer import cat_rows

SCRIPT = ROOT / "examples" / "accelerate_trainer.py"
LOGGED = ("loss", "grad_norm", "ce", "cat", "xg")
pytestmark = pytest.mark.filterwarnings("ignore:xg_variance", "ignore:.*use_cpu.*")


@pytest.fixture
def base_and_data(tmp_path, tiny_tokenizer):
    """A local base checkpoint (model + tokenizer, no adapters) and CAT-format JSONL, as a user has them."""
    base = tmp_path / "base"
    build(llama_config(), dtype=torch.float32).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in cat_rows(16)))
    return base, data


def script_args(base, data, output, **options):
    args = {"model": base, "data": data, "output": output, "max-steps": 3, "batch-size": 2, "backend": "reference",
            **options}
    return [part for name, value in args.items() for part in (f"--{name}", str(value))] + ["--cpu"]


def run_in_process(argv):
    spec = importlib.util.spec_from_file_location("accelerate_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def logged(output):
    return [{name: row[name] for name in LOGGED} for row in json.loads((output / "log_history.json").read_text())
            if "ce" in row]


def test_two_cpu_processes_train_as_one_with_the_same_global_batch(tmp_path, base_and_data, single_thread):
    base, data = base_and_data
    one, two = tmp_path / "one", tmp_path / "two"
    trainer = run_in_process(script_args(base, data, one, **{"grad-accum": 2}))
    assert trainer.accelerator.num_processes == 1

    # accelerate's torch launcher starts both processes; the script's --cpu makes them gloo CPU processes
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(SCRIPT), *script_args(base, data, two)]
    run_workers(launch)

    expected, got = logged(one), logged(two)
    assert len(expected) == len(got) == 3
    for want, have in zip(expected, got):
        assert have == pytest.approx(want, rel=1e-5, abs=1e-6)
    ours, theirs = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and any(bool(t.abs().max() > 0) for n, t in ours.items() if n.endswith("gate"))
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6)


def test_trainer_saves_adapters_from_the_gathered_state_dict(tmp_path, tiny_tokenizer):
    """Under FSDP / ZeRO-3 the parameters are shards: the Trainer gathers a full state dict on every process
    and hands it to `_save` on the main one, which must save the adapters from it, not from the shards."""
    from transformers import TrainingArguments

    model = build(llama_config(), dtype=torch.float32)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2))
    trainer = cah.CausalTrainer(model=model, args=TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[]),
                                train_dataset=cat_rows(4), processing_class=tiny_tokenizer)
    gathered = {name: value + 1 for name, value in model.state_dict().items()}  # what the shards add up to
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    for index, layer in cah.adapted_layers(model).items():
        torch.testing.assert_close(saved[f"layers.{index}.prompt"], layer.prompt.detach() + 1)
        torch.testing.assert_close(saved[f"layers.{index}.gate"], layer.gate.detach() + 1)


def test_fsdp2_config_reads_as_accelerates_fsdp2():
    """The documented FSDP2 config (examples/accelerate/fsdp2.yaml) is one Accelerate reads as FSDP v2 with a
    full state dict, wrapping a decoder layer class transformers has. Running it needs GPUs (module docstring)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from transformers.models.llama import modeling_llama

    config = load_config_from_file(str(ROOT / "examples" / "accelerate" / "fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.num_processes == 2
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert hasattr(modeling_llama, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
