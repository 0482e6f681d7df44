"""`backend="auto"`: CPU takes the composed path; CUDA follows the committed dispatch table, regenerated
from benchmark rows by `benchmarks.dispatch_table`."""
import json

import pytest
import torch

from benchmarks import dispatch_table
from causalattn import dispatch


def test_density_buckets_cover_the_sweep():
    assert dispatch.density_bucket("adapter", 0.5) == "-"
    assert [dispatch.density_bucket("adapter+cat+xg", f) for f in (0.003, 0.03, 0.1, 0.3, 1.0)] == \
        ["0.3%", "3%", "10%", "30%", "100%"]


def test_unmeasured_keys_run_the_composed_path():
    table = {("9.0", "bfloat16", "128", "adapter+cat+xg", "3%"): "triton"}
    assert dispatch.lookup("9.0", torch.bfloat16, 128, "adapter+cat+xg", 0.03, table) == "triton"
    assert dispatch.lookup("9.0", torch.bfloat16, 128, "adapter+cat+xg", 0.9, table) == "composed"
    assert dispatch.lookup("8.0", torch.bfloat16, 128, "adapter+cat+xg", 0.03, table) == "composed"


def test_cuda_auto_is_composed_on_a_device_without_verified_rows(tmp_path, monkeypatch):
    """A rule measured without passing correctness tests is on file but never chosen; a verified one is."""
    rule = {"capability": "9.0", "dtype": "bfloat16", "head_dim": 128, "features": "adapter+cat+xg", "density": "3%",
            "backend": "triton"}
    path = tmp_path / "table.json"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    read = dispatch.load_table.__wrapped__  # uncached: the file changes below
    monkeypatch.setattr(dispatch, "load_table", lambda: read(path))
    choose = lambda: dispatch.choose_cuda_backend(torch.device("cuda"), torch.bfloat16, 128, "adapter+cat+xg", 0.03)  # noqa: E731
    for rules, expected in (([], "composed"), ([{**rule, "verified": False}], "composed"), ([rule], "composed"),
                            ([{**rule, "verified": True}], "triton")):
        path.write_text(json.dumps({"rules": rules}))
        assert choose() == expected, rules


def test_committed_table_loads():
    assert isinstance(dispatch.load_table(), dict)


def _row(provider, ms, supervised=0.03, n=4096):
    return dict(provider=provider, status="ok", mode="fwd+bwd", dtype="bfloat16", head_dim="128", batch="4",
                seq_len=str(n), heads_q="32", heads_kv="8", supervised=str(supervised), median_ms=str(ms),
                device_type="cuda")


def test_rules_pick_the_faster_backend_per_key(tmp_path):
    rows = [_row("causalattn+all", 10.0), _row("composed+all", 12.0),  # 3 %: fused wins
            _row("causalattn+all", 10.0, 1.0), _row("composed+all", 8.0, 1.0),  # 100 %: composed wins
            _row("causalattn+all", 10.0, 1.0, 16384), _row("composed+all", 9.0, 1.0, 16384),
            _row("causalattn", 5.0), _row("composed", 4.0), _row("sdpa-flash", 3.0)]
    rules = {(r["features"], r["density"]): r for r in dispatch_table.rules_from_rows(rows, "9.0", verified=True)}
    assert rules[("adapter+cat+xg", "3%")]["backend"] == "triton"
    assert rules[("adapter+cat+xg", "100%")]["backend"] == "composed" and rules[("adapter+cat+xg", "100%")]["shapes"] == 2
    assert rules[("none", "-")]["backend"] == "composed"
    # The file round trip: rules of other keys already in the table survive a regeneration.
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rules": [{"capability": "8.0", "dtype": "float16", "head_dim": 64, "features": "none",
                                           "density": "-", "backend": "composed", "verified": True}]}))
    csv_path = tmp_path / "dispatch.csv"
    from benchmarks.harness import upsert_rows
    upsert_rows(csv_path, [{**r, "device": "gpu"} for r in rows])
    assert dispatch_table.main([str(csv_path), "--out", str(path), "--capability", "9.0", "--verified"]) == 0
    table = dispatch.load_table.__wrapped__(path)
    assert table[("8.0", "float16", "64", "none", "-")] == "composed"
    assert table[("9.0", "bfloat16", "128", "adapter+cat+xg", "3%")] == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_is_composed_on_cpu(dtype):
    import causalattn

    assert causalattn.ops.resolve_backend("auto", torch.zeros(1, 1, 1, 16, dtype=dtype)) == "composed"
