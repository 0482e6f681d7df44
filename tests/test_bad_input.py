"""Bad input from a careful user or a hostile file: every case is a clear error naming the argument, flag
or file:line and what was expected, before any long work; nothing is silently accepted. The numbered
groups follow the classes the inputs were probed in (data readers and the collator, the routing
helpers, the command line); `test_cli_probe_set` runs one command per class and asserts exit status 2
and no traceback.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import causalattn.hf as cah
from causalattn import Adapter
from causalattn.data.batches import collate
from causalattn.data.jsonl import read_file
from causalattn.data.records import Example
from causalattn.lab.cli import main
from causalattn.lab.training import tiny
from causalattn.routing import Router, segment_outputs
from test_train import FAST, SMALL

GOOD = {"input": "Smoking: 7, Weight: 3. Answer: ", "target": "High Risk",
        "important": [{"High Risk": ["Smoking: 7"]}]}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return tiny.ensure_tiny_base(SMALL, tmp_path_factory.mktemp("cache"), show_progress=False, log=lambda m: None)


def jsonl(path: Path, *lines: str | bytes) -> Path:
    """A file of a good record followed by `lines` (so the bad one is on line 2)."""
    body = [json.dumps(GOOD).encode()] + [line if isinstance(line, bytes) else line.encode() for line in lines]
    path.write_bytes(b"\n".join(body) + b"\n")
    return path


# ------------------------------------------------------------------------------ 1, 2, 9: the collator
def test_strict_collator_rejects_a_malformed_annotation_and_the_lenient_one_counts_it(tiny_tokenizer):
    bad = {**GOOD, "important": [{"x": 5}]}
    with pytest.raises(ValueError, match=r"features\[1\]: causes of 'x' must be a list of non-empty strings"):
        cah.CausalCollator(tiny_tokenizer, strict=True)([GOOD, bad])
    lenient = cah.CausalCollator(tiny_tokenizer)
    lenient([GOOD, bad])
    assert lenient.skipped == 1


def test_collator_names_the_feature_of_an_invalid_json_annotation(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"features\[0\]\['important'\]: invalid JSON"):
        cah.CausalCollator(tiny_tokenizer)([{**GOOD, "important": '[{"High Risk": ['}])


@pytest.mark.parametrize("max_length", [0, -3, 2.5, True])
def test_max_length_must_be_positive_or_none(max_length, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_length: expected a positive int or None"):
        cah.CausalCollator(tiny_tokenizer, max_length=max_length)
    with pytest.raises(ValueError, match="max_length: expected a positive int or None"):
        collate([Example("Smoking: 7. Answer:", "High Risk", {}, {})], tiny_tokenizer, max_length=max_length)


# ------------------------------------------------------------------------------ 3, 4, 5: JSONL files
@pytest.mark.parametrize("line, said", [
    (b'{"input": "caf\xe9", "target": "x"}', r"not UTF-8 text \(byte 0xe9 at character 15\)"),
    ('{"input": "a\\ud800b", "target": "x"}', r"'input' holds a lone surrogate '\\ud800' at index 1"),
    ('{"input": "a", "target": "x", "important": [{"x": ["\\udfff"]}]}', "a cause of 'x' holds a lone surrogate"),
    ('{"input": "a", "target": "x", "important": [{"x": ["a"]}], "important": []}',
     "the key 'important' appears twice"),
    ('{"input": "a", "target": NaN}', "NaN is not a JSON number"),
    ('{"input": "a", "target": -Infinity}', "-Infinity is not a JSON number"),
    ('{"input": "a", "target": 1e999}', "1e999 is beyond the float range"),
    ('{"input": "a", "target": "x", "extra": ' + "[" * 100000 + "]" * 100000 + "}", "JSON nested too deeply"),
], ids=["invalid-utf8", "lone-surrogate", "surrogate-cause", "duplicate-key", "nan", "infinity", "overflow",
        "deep-nesting"])
def test_jsonl_reader_names_file_and_line(line, said, tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", line)
    with pytest.raises(ValueError, match=f"{path}:2: {said}"):
        read_file(path)


# ------------------------------------------------------------------------------ 6, 7: the routing helpers
def segment_problem(segments, gate_rows):
    q = torch.randn(1, 2, 3, 16)
    return q, Adapter(torch.randn(1, 6, 16), torch.randn(1, 6, 16), torch.zeros(gate_rows, 2), segments=segments)


@pytest.mark.parametrize("segments, gate_rows, said", [
    ((2, 3), 2, r"adapter.segments: expected slot counts summing to the adapter length 6, got \(2, 3\)"),
    ((3, 3), 3, r"adapter.gate: expected shape .* for 2 segment\(s\), got \(3, 2\)"),
])
def test_segment_outputs_checks_its_arguments_as_attention_does(segments, gate_rows, said):
    with pytest.raises(ValueError, match=said):
        segment_outputs(*segment_problem(segments, gate_rows))
    q, adapter = segment_problem((3, 3), 2)
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        segment_outputs(q[0], adapter)
    with pytest.raises(ValueError, match="scale: expected a positive finite float"):
        segment_outputs(q, adapter, scale=-1.0)


def test_router_checks_its_arguments():
    with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
        Router(0, 2)
    with pytest.raises(ValueError, match=r"hidden: expected \(B, N, 8\) hidden states"):
        Router(8, 2)(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="domain_ids: expected integer domain ids, got torch.float32"):
        Router(8, 2, mode="oracle")(torch.randn(2, 3, 8), domain_ids=torch.tensor([0.7, 1.2]))
    one_token = torch.tensor([[True, False, False]])
    with pytest.raises(ValueError, match="token_mask: in training the router's batch norm .* at least 2"):
        Router(8, 2)(torch.randn(1, 3, 8), one_token)
    router = Router(8, 2).eval()
    assert router(torch.randn(1, 3, 8), one_token).index.shape == (1,)  # fine with running statistics


# ------------------------------------------------------------------------------ 8, 9: the command line
def probes(tmp_path: Path, model: Path) -> list[tuple[list[str], str]]:
    """(arguments, start of the message) of one command per class of bad input."""
    bad_utf8 = jsonl(tmp_path / "utf8.jsonl", b'{"input": "caf\xe9", "target": "x"}')
    surrogate = jsonl(tmp_path / "surrogate.jsonl", '{"input": "a\\ud800", "target": "x"}')
    duplicate = jsonl(tmp_path / "duplicate.jsonl", '{"input": "a", "target": "x", "target": "y"}')
    nan = jsonl(tmp_path / "nan.jsonl", '{"input": "a", "target": NaN}')
    deep = jsonl(tmp_path / "deep.jsonl", '{"input": "a", "target": "x", "e": ' + "[" * 50000 + "]" * 50000 + "}")
    malformed = jsonl(tmp_path / "malformed.jsonl", json.dumps({**GOOD, "important": [{"x": 5}]}))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    out = str(tmp_path / "out")
    m = ["--model", str(model)]
    return [
        (m + ["--data", str(malformed), "--strict", "--output-dir", out], f"--data: {malformed}:2: causes of 'x'"),
        (m + ["--data", str(bad_utf8), "--output-dir", out], f"--data: {bad_utf8}:2: not UTF-8 text"),
        (m + ["--data", str(surrogate), "--output-dir", out], f"--data: {surrogate}:2: 'input' holds a lone surrogate"),
        (m + ["--data", str(duplicate), "--output-dir", out], f"--data: {duplicate}:2: the key 'target' appears twice"),
        (m + ["--data", str(nan), "--output-dir", out], f"--data: {nan}:2: NaN is not a JSON number"),
        (m + ["--data", str(deep), "--output-dir", out], f"--data: {deep}:2: JSON nested too deeply"),
        (m + ["--backend", "triton", "--device", "cpu", "--output-dir", out], "--backend: triton runs on CUDA GPUs"),
        (m + [*FAST, "--max-length", "3", "--output-dir", out], "--max-length: the generated train example 0 has"),
        (m + ["--output-dir", "/sys/causalattn-probe"], "--output-dir: /sys/causalattn-probe cannot be written"),
        (m + ["--output-dir", str(a_file)], f"--output-dir: {a_file} is a file"),
        (m + ["--output-dir", str(a_file / "job")], f"--output-dir: {a_file / 'job'} cannot be created"),
        (m + ["--no-xg", "--xg-lambda", "5", "--output-dir", out], "--xg-lambda: weighs the XG loss, which no run has"),
        (m + ["--runs", "ce", "--domains", "4", "--output-dir", out], "--domains: configures routed adapters"),
        (m + ["--runs", "ce", "--cat-decay", "1", "--output-dir", out], "--cat-decay: decays the CAT loss"),
        (m + ["--qk-lr", "0.1", "--output-dir", out], "--qk-lr: the learning rate of the q/k weights"),
        (m + ["--task", "cancer-risk", "--cue-agreement", "0.8", "--output-dir", out], "--cue-agreement: sets the cue"),
        (m + ["--strict", "--output-dir", out], "--strict: checks the annotations of a JSONL --data file"),
        (m + ["--cat-layers", "7", "--output-dir", out], "--cat-layers: the model has"),
        (m + ["--mixed-precision", "bf16", "--dtype", "float64", "--output-dir", out], "--mixed-precision: bf16"),
        (m + ["--save-steps", "0", "--output-dir", out], "--save-steps: expected a positive integer"),
    ]


def test_cli_probe_set(small_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the triton probe is about a machine without CUDA
    results = []
    for argv, said in probes(tmp_path, small_model):
        code = main(["train", *argv])
        captured = capsys.readouterr()
        results.append((argv, code, said in captured.err, "Traceback" in captured.out + captured.err))
        assert (code, "Traceback" in captured.err) == (2, False), (argv, captured.err[-2000:])
        assert f"causalattn train: error: {said}" in captured.err, (argv, captured.err[-2000:])
    assert not (tmp_path / "out").exists()  # every probe stopped before making the job's directory
    assert len(results) == 20


def test_cli_probe_in_a_real_process_prints_no_traceback(tmp_path):
    """One probe through the console entry point: exit status 2 and argparse's "prog: error: message" form."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = subprocess.run([sys.executable, "-m", "causalattn.lab.cli", "train", "--output-dir", str(a_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"causalattn train: error: --output-dir: {a_file} is a file; expected a directory " \
                                  "(new or existing)"
