"""CE + CAT + XG through the real Hugging Face Trainer (`causalattn.hf.CausalTrainer`), bf16 autocast on
CPU, a tiny LLaMA, CAT-format rows: the losses are logged apart, the adapters learn, checkpoints hold
the adapters only and a run resumes from one."""
import json
import random

import pytest
import torch
from transformers import TrainingArguments

import causalattn.hf as cah
from hf_helpers import build, llama_config

pytestmark = pytest.mark.filterwarnings("ignore:xg_variance", "ignore:.*bf16.*", "ignore:.*use_cpu.*")


def cat_rows(count, seed=0):
    """CAT's record format: the input ends in "Answer: ", `important` a list of {effect: [causes]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        values = {name: rng.randint(0, 10) for name in ("Smoking", "Weight", "Exercise", "Age")}
        answer = "High Risk" if values["Smoking"] + values["Weight"] > values["Exercise"] + 8 else "Low Risk"
        facts = ", ".join(f"{k}: {v}" for k, v in values.items())
        rows.append({"input": f"{facts}. Answer: ", "target": answer,
                     "important": json.dumps([{answer: [f"Smoking: {values['Smoking']}", f"Exercise: {values['Exercise']}"]}])})
    return rows


def trainer_for(tmp_path, tokenizer, adapter=None, rows=None, cat_heads="mean", cat_layers=None, **overrides):
    model = build(llama_config(), dtype=torch.float32)
    cah.add_adapters(model, adapter or cah.AdapterConfig(length=4, layers=2, xg_tokens=2))
    cah.set_backend(model, "reference")
    options = {**dict(output_dir=str(tmp_path / "out"), bf16=True, use_cpu=True, max_steps=4, save_steps=2,
                      logging_steps=1, per_device_train_batch_size=4, learning_rate=5e-2, report_to=[],
                      dataloader_num_workers=0, seed=0), **overrides}
    return cah.CausalTrainer(model=model, args=TrainingArguments(**options), train_dataset=rows or cat_rows(16),
                             processing_class=tokenizer, cat_weight=1.0, xg_weight=1.0, cat_heads=cat_heads,
                             cat_layers=cat_layers)


def test_trainer_trains_ce_cat_xg_in_bf16_and_saves_adapters(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer)
    assert trainer.args.remove_unused_columns is False
    assert trainer.accelerator.mixed_precision == "bf16"  # the forward runs under CPU bf16 autocast
    trainer.train()
    logs = [row for row in trainer.state.log_history if "ce" in row]
    assert len(logs) == 4 and all(row["cat"] != 0 and row["xg"] >= 0 for row in logs)
    first = logs[0]
    assert first["loss"] == pytest.approx(first["ce"] + first["cat"] + first["xg"], abs=2e-2)
    gates = [layer.gate for layer in cah.adapted_layers(trainer.model).values()]
    assert any(float(gate.detach().abs().max()) > 0 for gate in gates)  # the zero-init gates moved
    checkpoint = tmp_path / "out" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "causalattn_adapter.json", "optimizer.pt"} <= names
    assert not {"vq", "mi"} & set(logs[0])  # unrouted adapters log no routing terms
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # the frozen base is not copied

    # resume from the checkpoint: the adapters come back and the run ends at the same step
    resumed = trainer_for(tmp_path, tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    back = build(llama_config(), dtype=torch.float32)
    cah.load_adapters(back, tmp_path / "out" / "checkpoint-4")
    for index, layer in cah.adapted_layers(back).items():
        torch.testing.assert_close(layer.gate, cah.adapted_layers(resumed.model)[index].gate)


def test_trainer_scores_every_head_with_cat_heads_each(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="cat_heads: expected one of"):
        trainer_for(tmp_path, tiny_tokenizer, cat_heads="max")
    trainer = trainer_for(tmp_path, tiny_tokenizer, cat_heads="each", max_steps=2, save_steps=10)
    batch = trainer.data_collator(cat_rows(4))
    supervision = batch.pop(cah.SUPERVISION_KWARG)
    with cah.collect(trainer.model) as stats, torch.no_grad():
        trainer.model(**batch, supervision=supervision)
    each, mean = stats.cat_loss(heads="each"), stats.cat_loss()
    assert each.item() != pytest.approx(mean.item())  # the heads differ, so the two reductions do
    trainer.train()
    assert all(row["cat"] != 0 for row in trainer.state.log_history if "cat" in row)


def test_trainer_supervises_only_the_cat_layers(tmp_path, tiny_tokenizer):
    for bad in ([], [0, 9], [-1], [0.5]):
        with pytest.raises(ValueError, match=r"cat_layers: expected layer indices of the model's 2 layers \(0-1\)"):
            trainer_for(tmp_path, tiny_tokenizer, cat_layers=bad)
    trainer = trainer_for(tmp_path, tiny_tokenizer, cat_layers=[1, 1], max_steps=1, save_steps=10)
    assert trainer.cat_layers == (1,)
    batch = trainer.data_collator(cat_rows(4))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        with cah.collect(trainer.model) as stats:
            ce = trainer.model(**batch).loss
    only_top = stats.cat_loss(layers=[1])
    assert only_top.item() != pytest.approx(stats.cat_loss().item())  # the layers differ, so the selections do
    torch.testing.assert_close(loss, ce + only_top + stats.xg_loss(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", ["vq", "oracle"])
def test_routed_adapters_train_with_vq_and_mi(tmp_path, tiny_tokenizer, route):
    """As `causalattn train`: CE + CAT + XG + 0.1 VQ + 0.01 MI (+ CE of the invariant prompts alone), the
    routing inputs from the collator (label rows, prompt tokens, the records' domain ids)."""
    rows = [{**row, "domain": i % 2} for i, row in enumerate(cat_rows(8))]
    adapter = cah.AdapterConfig(length=4, layers=2, xg_tokens=2, domains=2, domain_length=3, route=route, router_dim=6)
    trainer = trainer_for(tmp_path, tiny_tokenizer, adapter=adapter, rows=rows, max_steps=2)
    trainer.invariant_ce = 1.0
    assert trainer.data_collator.routing
    batch = trainer.data_collator(rows[:4])
    assert batch[cah.DOMAINS_KWARG].tolist() == [0, 1, 0, 1] and batch[cah.LABEL_ROWS_KWARG].shape == (4,)
    trainer.train()
    logs = [row for row in trainer.state.log_history if "ce" in row]
    assert len(logs) == 2 and all("mi" in row for row in logs)  # tiny read-outs: MI rounds to 0 in the log
    assert all(row["vq"] > 0 for row in logs) if route == "vq" else all(row["vq"] == 0 for row in logs)
    for row in logs:  # the CE of the invariant prompts alone (about the CE itself) is in the loss too
        routed = row["ce"] + row["cat"] + row["xg"] + 0.1 * row["vq"] + 0.01 * row["mi"]
        assert row["loss"] - routed == pytest.approx(row["ce"], rel=0.05)
    domain_gates = [layer.domain_gate for layer in cah.adapted_layers(trainer.model).values()]
    assert all(float(gate.detach().abs().max()) > 0 for gate in domain_gates)  # the zero-init domain gates moved
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_collator_builds_the_mask_and_skips_pairs_that_cannot_supervise(tiny_tokenizer):
    tiny_tokenizer.padding_side = "right"
    collator = cah.CausalCollator(tiny_tokenizer)
    rows = cat_rows(2)
    rows[1] = {**rows[1], "important": [{"Low Risk": ["not in the text"]}, {"High Risk": ["not in the text"]}]}
    batch = collator(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "supervision"}
    assert batch["supervision"].valid_rows()[0].any() and not batch["supervision"].valid_rows()[1].any()
    assert collator.skipped == 2
    with pytest.raises(TypeError, match=r"features\[0\]: expected a causalattn Example or a mapping"):
        collator([3])


def test_readme_trainer_example_runs(tmp_path, tiny_tokenizer, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "CausalTrainer(" in b]
    assert len(block.strip().splitlines()) <= 10
    fast = block.replace("max_steps=200, save_steps=50", "max_steps=2, save_steps=2, use_cpu=True, report_to=[]")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mawps_train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in cat_rows(8)))
    model = build(llama_config(), dtype=torch.float32)
    cah.set_backend(model, "reference")  # what "auto" runs on a user's CPU (here the interpreter is on)
    scope = {"model": model, "tokenizer": tiny_tokenizer}
    exec(compile(fast, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_trl_sft_trainer_trains_ce_cat_xg(tmp_path, tiny_tokenizer):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig

    from causalattn.hf.sft import CausalSFTTrainer

    model = build(llama_config(), dtype=torch.float32)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2, xg_tokens=2))
    cah.set_backend(model, "reference")
    config = SFTConfig(output_dir=str(tmp_path / "sft"), bf16=True, use_cpu=True, max_steps=2, save_steps=2,
                       logging_steps=1, per_device_train_batch_size=4, learning_rate=5e-2, report_to=[])
    trainer = CausalSFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(cat_rows(8)),
                               processing_class=tiny_tokenizer, cat_weight=1.0, xg_weight=1.0)
    trainer.train()
    logs = [row for row in trainer.state.log_history if "ce" in row]
    assert len(logs) == 2 and all(row["cat"] != 0 for row in logs)
    assert (tmp_path / "sft" / "checkpoint-2" / "adapter_model.safetensors").is_file()
