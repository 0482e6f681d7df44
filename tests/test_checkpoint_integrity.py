"""Checkpoints that detect damage and fall back (`causalattn.checkpoint_files`): every corruption mode a
careful user met, plus flipped bytes, is named with its file, `--resume` falls back to the newest
intact checkpoint and then continues bit for bit as an uninterrupted run, also from a step checkpoint
in the middle of an epoch (`--save-steps`); no intact checkpoint is an error, never a silent restart.
The same manifests guard `load_adapters` and `CausalTrainer`'s checkpoints.
"""
import shutil
from pathlib import Path

import pytest
import torch

import causalattn.hf as cah
from causalattn.checkpoint_files import MANIFEST_NAME, CorruptCheckpoint, seal, verify
from causalattn.lab.cli import main
from causalattn.lab.training import checkpoint, tiny
from test_train import FAST, SMALL, adapter_weights, report_of

pytestmark = pytest.mark.filterwarnings("ignore:xg_variance")

# --train-qk: the base weights file is part of every checkpoint too
OPTIONS = ["--runs", "ce+cat+xg", "--train-qk", *FAST]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return tiny.ensure_tiny_base(SMALL, tmp_path_factory.mktemp("cache"), show_progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def straight(small_model, tmp_path_factory):
    """An uninterrupted two-epoch job: what every resumed one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "job"
    assert main(["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out)]) == 0
    return out


def same_run(a: Path, b: Path) -> None:
    """Two jobs with the same history, accuracies and final adapters, bit for bit."""
    first, second = report_of(a)["runs"][0], report_of(b)["runs"][0]
    assert second["history"] == first["history"]
    assert second["accuracy"] == first["accuracy"]
    wa, wb = adapter_weights(first["adapter_dir"]), adapter_weights(second["adapter_dir"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def flip_two_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (len(data) - 40, len(data) - 7):  # inside the tensor data, past the header
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# (file damaged in the newest checkpoint, how, what the message says)
FOLDER_DAMAGE = [
    ("trainer_state.pt", truncate, "truncated"),
    ("adapter_model.safetensors", truncate, "truncated"),
    ("adapter_model.safetensors", lambda p: p.write_bytes(b""), "empty"),
    ("base_weights.safetensors", truncate, "truncated"),
    ("progress.json", truncate, "truncated"),
    ("causalattn_adapter.json", truncate, "truncated"),
    ("adapter_model.safetensors", flip_two_bytes, "altered"),
    (MANIFEST_NAME, truncate, "not a readable manifest"),
]


@pytest.mark.parametrize("name, damage, said", FOLDER_DAMAGE,
                         ids=["state-truncated", "adapter-half", "adapter-empty", "base-truncated",
                              "progress-truncated", "config-truncated", "adapter-flipped", "manifest-truncated"])
def test_damaged_newest_checkpoint_falls_back_and_resumes_bit_identically(name, damage, said, small_model,
                                                                          straight, tmp_path, capsys):
    out = tmp_path / "job"
    shutil.copytree(straight, out)
    run_dir = out / "ce-cat-xg"
    damage(run_dir / "checkpoints" / "epoch-002" / name)
    assert main(["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out), "--resume"]) == 0
    error = capsys.readouterr().err
    assert f"{run_dir / 'checkpoints' / 'epoch-002' / name}: {said}" in error and "skipped" in error
    assert report_of(out)["runs"][0]["resumed_at_epoch"] == 1  # the fallback
    same_run(straight, out)
    # the damaged folder is kept aside, the rewritten one verifies
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["epoch-001", "epoch-002", "epoch-002.damaged", "latest"]
    verify(run_dir / "checkpoints" / "epoch-002")


@pytest.mark.parametrize("pointer, said", [("", "empty"), ("epoch-007\n", "names epoch-007, which does not exist")],
                         ids=["latest-empty", "latest-missing-epoch"])
def test_damaged_latest_pointer_is_reported_and_the_folders_decide(pointer, said, small_model, straight, tmp_path,
                                                                   capsys):
    out = tmp_path / "job"
    shutil.copytree(straight, out)
    latest = out / "ce-cat-xg" / "checkpoints" / "latest"
    latest.write_text(pointer)
    shutil.rmtree(out / "ce-cat-xg" / "checkpoints" / "epoch-002")  # and the newest folder is gone too
    assert main(["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out), "--resume"]) == 0
    assert f"{latest}: {said}" in capsys.readouterr().err
    same_run(straight, out)


def test_no_intact_checkpoint_stops_with_every_bad_file_and_deletes_nothing(small_model, straight, tmp_path,
                                                                           capsys):
    out = tmp_path / "job"
    shutil.copytree(straight, out)
    root = out / "ce-cat-xg" / "checkpoints"
    truncate(root / "epoch-002" / "trainer_state.pt")
    (root / "epoch-001" / "progress.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "no intact checkpoint" in error and "nothing was deleted" in error
    assert f"{root / 'epoch-002' / 'trainer_state.pt'}: truncated" in error
    assert f"{root / 'epoch-001' / 'progress.json'}: truncated" in error
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_checkpoints_written_before_manifests_still_resume(small_model, straight, tmp_path, capsys):
    out = tmp_path / "job"
    shutil.copytree(straight, out)
    root = out / "ce-cat-xg" / "checkpoints"
    for manifest in out.rglob(MANIFEST_NAME):
        manifest.unlink()
    shutil.rmtree(root / "epoch-002")
    args = ["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out), "--resume"]
    assert main(args) == 0
    assert "epoch-001 was written before manifests: resumed from it unverified" in capsys.readouterr().err
    same_run(straight, out)
    # unverified, a damaged one is still named rather than crashing
    for manifest in out.rglob(MANIFEST_NAME):
        manifest.unlink()
    truncate(root / "epoch-002" / "progress.json")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"--resume: {root / 'epoch-002'} was written before manifests and cannot be read" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("options", [[], ["--task", "dialects", "--runs", "ce+routed", "--route", "vq"]],
                         ids=["cat-xg", "routed"])
def test_step_checkpoints_resume_mid_epoch_bit_identically(options, small_model, tmp_path, monkeypatch):
    """8 steps per epoch, --save-steps 3: step-000003, -006 in epoch 1, then -009, -012, -015 in epoch 2; a
    crash after step-000012 resumes in the middle of epoch 2 (the routed run also needs its epoch's routes)."""
    args = ["train", "--model", str(small_model), *OPTIONS, *options]
    assert main(args + ["--output-dir", str(tmp_path / "straight")]) == 0
    written = []
    real_save = checkpoint.save_checkpoint

    def save_then_crash(run_dir, name, *a, **kw):
        written.append(name)
        real_save(run_dir, name, *a, **kw)
        if name == "step-000012":
            raise KeyboardInterrupt("simulated crash in the middle of epoch 2")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output-dir", str(tmp_path / "resumed"), "--save-steps", "3"])
    assert written == ["step-000003", "step-000006", "epoch-001", "step-000009", "step-000012"]
    root = next((tmp_path / "resumed").glob("*/checkpoints"))
    # epoch 1's step checkpoints went once epoch-001 was written
    assert sorted(p.name for p in root.iterdir()) == ["epoch-001", "latest", "step-000009", "step-000012"]
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert main(args + ["--output-dir", str(tmp_path / "resumed"), "--save-steps", "3", "--resume"]) == 0
    same_run(tmp_path / "straight", tmp_path / "resumed")
    assert sorted(p.name for p in root.iterdir()) == ["epoch-001", "epoch-002", "latest"]


def test_full_disk_at_the_first_checkpoint_is_a_clear_error(small_model, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    out = tmp_path / "job"
    assert main(["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--output-dir: could not write the checkpoint" in error and "No space left on device" in error
    assert "Traceback" not in error
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no staging left behind


def test_full_disk_at_the_final_adapters_keeps_the_checkpoints(small_model, straight, tmp_path, monkeypatch, capsys):
    import causalattn.hf.io as io

    real_save_file = io.save_file

    def full_in_the_adapter_folder(tensors, path, **kwargs):
        if Path(path).parent.name == "adapter":
            raise OSError(28, "No space left on device")
        real_save_file(tensors, path, **kwargs)

    monkeypatch.setattr(io, "save_file", full_in_the_adapter_folder)
    out = tmp_path / "job"
    args = ["train", "--model", str(small_model), *OPTIONS, "--output-dir", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "--output-dir: could not write the trained adapters" in error and "Traceback" not in error
    monkeypatch.setattr(io, "save_file", real_save_file)
    assert main(args + ["--resume"]) == 0  # from the last checkpoint: nothing to train again
    same_run(straight, out)


# ------------------------------------------------------------------------------ the library
def sealed_folder(root: Path) -> Path:
    folder = root / "saved"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"0123456789")
    (folder / "sub" / "b.json").write_text("{}")
    seal(folder)
    return folder


@pytest.mark.parametrize("damage, said", [
    (lambda f: (f / "a.bin").write_bytes(b"01234"), "a.bin: truncated: 5 bytes, the manifest says 10"),
    (lambda f: (f / "a.bin").write_bytes(b""), "a.bin: empty: 0 bytes"),
    (lambda f: (f / "a.bin").write_bytes(b"0123456789!"), "a.bin: longer than written"),
    (lambda f: (f / "a.bin").write_bytes(b"0123X56789"), "a.bin: altered"),
    (lambda f: (f / "sub" / "b.json").unlink(), "b.json: missing"),
    (lambda f: (f / MANIFEST_NAME).write_text('{"format": "other"}'), f"{MANIFEST_NAME}: not a causalattn"),
    (lambda f: (f / MANIFEST_NAME).unlink(), f"{MANIFEST_NAME}: missing"),
], ids=["truncated", "empty", "longer", "altered", "missing", "foreign-manifest", "no-manifest"])
def test_manifest_names_each_kind_of_damage(damage, said, tmp_path):
    folder = sealed_folder(tmp_path)
    verify(folder)
    (folder / "notes.txt").write_text("not listed: ignored")
    verify(folder)
    damage(folder)
    with pytest.raises(CorruptCheckpoint, match=said):
        verify(folder)


def test_load_adapters_names_the_damaged_file(tmp_path):
    from hf_helpers import build, llama_config

    model = build(llama_config())
    cah.add_adapters(model, cah.AdapterConfig(length=3, layers=2))
    directory = cah.save_adapters(model, tmp_path / "adapter")
    assert (directory / MANIFEST_NAME).is_file()
    cah.load_adapters(build(llama_config()), directory)
    flip_two_bytes(directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors: altered"):
        cah.load_adapters(build(llama_config()), directory)
    # a folder saved before manifests loads unverified, and what cannot be parsed is still named
    cah.save_adapters(model, directory)
    (directory / MANIFEST_NAME).unlink()
    cah.load_adapters(build(llama_config()), directory)
    (directory / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        cah.load_adapters(build(llama_config()), directory)
    (directory / "causalattn_adapter.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="causalattn_adapter.json: not a readable JSON config"):
        cah.load_adapters(build(llama_config()), directory)


@pytest.mark.filterwarnings("ignore:.*bf16.*", "ignore:.*use_cpu.*")
def test_causal_trainer_resumes_from_the_newest_intact_checkpoint(tmp_path, tiny_tokenizer, caplog):
    from test_hf_trainer import trainer_for

    trainer = trainer_for(tmp_path, tiny_tokenizer)
    trainer.train()
    out = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-4"):
        verify(out / name)  # sealed by the callback, every file of the checkpoint listed
    truncate(out / "checkpoint-4" / "optimizer.pt")
    resumed = trainer_for(tmp_path, tiny_tokenizer)
    resumed.train(resume_from_checkpoint=True)
    assert f"{out / 'checkpoint-4' / 'optimizer.pt'}: truncated" in caplog.text
    assert resumed.state.global_step == 4
    for index, layer in cah.adapted_layers(trainer.model).items():  # steps 3-4 again, from checkpoint-2
        torch.testing.assert_close(cah.adapted_layers(resumed.model)[index].gate, layer.gate)
    truncate(out / "checkpoint-2" / "trainer_state.json")
    truncate(out / "checkpoint-4" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        trainer_for(tmp_path, tiny_tokenizer).train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="checkpoint-2/trainer_state.json: truncated"):
        trainer_for(tmp_path, tiny_tokenizer).train(resume_from_checkpoint=str(out / "checkpoint-2"))
