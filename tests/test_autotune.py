"""The tile autotuner's choice and cache (kernels/autotune.py `launch_tuned`), on CPU: a fake device
capability and a fake timer stand in for the GPU, the launches are recorded, nothing is timed."""
import dataclasses
import json

import pytest
import torch
import triton

from causalattn.kernels import autotune, tiles

CUDA = torch.device("cuda")  # a device object only; nothing runs on it


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Autotuning on, as on a CUDA machine; returns the launches and the timer's calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CAUSALATTN_AUTOTUNE", "1")
    monkeypatch.delenv("CAUSALATTN_TILES", raising=False)
    monkeypatch.setattr(tiles, "interpreting", lambda: False)
    monkeypatch.setattr(autotune, "_capability", lambda device: "sm90")
    monkeypatch.setattr(autotune, "_tuned", {})
    monkeypatch.setattr(autotune, "_loaded_from", [])
    launches, timed = [], []
    fastest = tiles.tile_candidates(128, "dkdv", torch.bfloat16)[-1]

    def fake_time(launch):
        launch()
        timed.append(launches[-1])
        return 1.0 if launches[-1] == fastest else 2.0

    monkeypatch.setattr(autotune, "_time_launch", fake_time)
    return launches, timed, fastest


def run(launches, kernel="dkdv", device=CUDA, features="causal"):
    return autotune.launch_tuned(kernel, 128, torch.bfloat16, device, features, launches.append)


def test_candidates_start_with_the_table_and_are_distinct():
    for kernel in ("dkdv", "dq"):
        for dtype in (torch.bfloat16, torch.float32):
            candidates = tiles.tile_candidates(128, kernel, dtype)
            assert candidates[0] == tiles.tile_config(128, kernel, dtype)
            assert len(candidates) == len(set(candidates)) > 1


def test_times_each_candidate_once_then_launches_the_winner_and_caches_it(tuner):
    launches, timed, fastest = tuner
    assert run(launches) == fastest
    assert timed == tiles.tile_candidates(128, "dkdv", torch.bfloat16)
    assert launches[-1] == fastest
    path = autotune.cache_path()
    assert triton.__version__ in path.name and path.parent.name == "causalattn"
    assert json.loads(path.read_text()) == {"sm90/dkdv/bfloat16/d128/causal": list(dataclasses.astuple(fastest))}
    launches.clear()
    assert run(launches) == fastest and launches == [fastest]  # memory cache: no more timing
    assert len(timed) == len(tiles.tile_candidates(128, "dkdv", torch.bfloat16))


def test_a_new_process_reads_the_file(tuner, monkeypatch):
    launches, timed, fastest = tuner
    run(launches)
    monkeypatch.setattr(autotune, "_tuned", {})
    monkeypatch.setattr(autotune, "_loaded_from", [])
    timed.clear()
    launches.clear()
    assert run(launches) == fastest and launches == [fastest] and timed == []


def test_keys_separate_kernels_and_features(tuner):
    launches, timed, _ = tuner
    run(launches)
    run(launches, kernel="dq")
    run(launches, features="causal+cat")
    assert set(json.loads(autotune.cache_path().read_text())) == {
        "sm90/dkdv/bfloat16/d128/causal", "sm90/dq/bfloat16/d128/causal", "sm90/dkdv/bfloat16/d128/causal+cat"}


def test_a_corrupt_file_is_measured_again_and_rewritten(tuner):
    launches, timed, fastest = tuner
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert run(launches) == fastest and timed
    assert json.loads(path.read_text())


@pytest.mark.parametrize("setting", ["off", "override", "cpu", "interpreter"])
def test_no_timing_when_off_overridden_on_cpu_or_interpreted(tuner, monkeypatch, setting):
    launches, timed, _ = tuner
    device = CUDA
    expected = tiles.tile_config(128, "dkdv", torch.bfloat16)
    if setting == "off":
        monkeypatch.delenv("CAUSALATTN_AUTOTUNE")
    elif setting == "override":
        monkeypatch.setenv("CAUSALATTN_TILES", "dkdv=64x128x8x3")
        expected = tiles.TileConfig(64, 128, 8, 3)
    elif setting == "cpu":
        device = torch.device("cpu")
    else:
        monkeypatch.setattr(tiles, "interpreting", lambda: True)
        expected = tiles.tile_config(128, "dkdv", torch.bfloat16)
    assert run(launches, device=device) == expected
    assert launches == [expected] and timed == []
    assert not autotune.cache_path().exists()


def test_a_candidate_out_of_resources_is_skipped(tuner, monkeypatch):
    launches, timed, fastest = tuner

    def fake_time(launch):
        launch()
        if launches[-1] == fastest:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return 1.0

    monkeypatch.setattr(autotune, "_time_launch", fake_time)
    assert run(launches) != fastest
