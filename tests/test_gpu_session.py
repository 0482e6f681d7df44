"""The GPU session script and its summary tools, dry-run on a CPU machine: every stage skips cleanly,
at most 8 files come back, and the ratio table reads sweep CSVs."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import harness, ratios

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _row(provider: str, mode: str, ms: float) -> dict:
    row = dict.fromkeys(harness.FIELDS, "")
    row.update(device="GPU", provider=provider, mode=mode, batch="4", seq_len="4096", heads_q="32", heads_kv="8",
               head_dim="128", adapter_len="10", xg_tokens="2", dtype="bfloat16", status="ok", median_ms=str(ms))
    return row


def test_ratios_against_sdpa_flash_and_the_fastest_sdpa_backend(tmp_path, capsys):
    path = tmp_path / "kernel-core.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, harness.FIELDS)
        writer.writeheader()
        writer.writerows([_row("sdpa-flash", "bwd", 2.0), _row("sdpa-cudnn", "bwd", 1.6), _row("causalattn", "bwd", 2.4),
                          _row("sdpa-flash", "fwd", 1.0), _row("causalattn", "fwd", 0.9)])
    assert ratios.main([str(path), str(tmp_path / "absent.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    bwd = next(line for line in lines if line.startswith("bwd"))
    fwd = next(line for line in lines if line.startswith("fwd"))
    assert bwd.split()[-3:] == ["1.20", "1.50", "sdpa-cudnn"]
    assert fwd.split()[-3:] == ["0.90", "0.90", "sdpa-flash"]


@pytest.mark.skipif(sys.platform != "linux", reason="a bash script")
def test_session_dry_run_skips_every_stage_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    stages = [line for line in summary.splitlines() if line.startswith("### ")]
    assert len(stages) == 8 and stages[-1].startswith("### done")  # machine, six stages, done
    assert summary.count("skipped: no CUDA device") == 6
    assert 1 <= len(list(tmp_path.iterdir())) <= 8
