"""`causalattn demo` runs in-process, prints finite numbers and shows the zero-init property."""
import math
import re

import pytest

from causalattn.lab import cli, demo

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"


def _numbers(line: str) -> list[float]:
    """Every number in a line after its label, shapes excluded."""
    value = re.sub(r"\([\d, ]*\)", "", line.split("  ", 2)[-1])
    return [float(x) for x in re.findall(NUMBER, value, flags=re.IGNORECASE)]


@pytest.fixture(scope="module")
def demo_output():
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli.main(["demo", "--seq-len", "96", "--seed", "1"]) == 0
    return buffer.getvalue()


def test_demo_prints_finite_numbers(demo_output):
    lines = {line.strip().split("  ")[0]: line for line in demo_output.splitlines() if line.startswith("  ")}
    for label in ("CAT loss (div, alpha=2)", "XG variance (output space)", "gate gradient (per query head)",
                  "max |dense - chunked| out", "max |dense - chunked| dq", "max |dense - chunked| dgate"):
        assert label in lines, f"missing row {label!r} in:\n{demo_output}"
    for label, line in lines.items():
        for value in _numbers(line):
            assert math.isfinite(value), f"{label}: non-finite value in {line!r}"
    assert _numbers(lines["CAT loss (div, alpha=2)"])[0] < 0  # random attention under-attends causes
    assert len(_numbers(lines["gate gradient (per query head)"])) == demo.HEADS_Q
    # float32 chunked vs dense agree to rounding
    for label, line in lines.items():
        if label.startswith("max |dense - chunked|"):
            diff, scale = _numbers(line)[:2]
            assert diff <= 1e-5 * max(1.0, scale), line


def test_demo_zero_init_line(demo_output):
    zero = [line for line in demo_output.splitlines() if line.startswith("zero-init")]
    assert len(zero) == 1, demo_output
    values = dict(re.findall(r"(max\|dKa\||max\|dVa\||min\|dgate\||XG variance) = (" + NUMBER + ")", zero[0]))
    assert float(values["max|dKa|"]) == 0.0
    assert float(values["max|dVa|"]) == 0.0
    assert float(values["XG variance"]) == 0.0
    assert float(values["min|dgate|"]) > 0.0  # every head's gate still learns


def test_demo_report_float64_exact_agreement():
    report = demo.run_demo(seq_len=64, seed=2, dtype="float64")
    assert report.rows_per_block == 16  # several blocks even at small N
    assert all(diff <= 1e-12 * max(1.0, report.max_abs[name]) for name, diff in report.max_diff.items()), report.max_diff
    assert report.zero_init["max|dKa|"] == report.zero_init["max|dVa|"] == 0.0
    assert report.shapes["out"] == (demo.BATCH, demo.HEADS_Q, 64, demo.HEAD_DIM)
    assert report.shapes["xg"] == (demo.BATCH, demo.HEADS_Q, demo.HEAD_DIM)


def test_demo_rejects_bad_options():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--dtype", "int8"])
    with pytest.raises(ValueError, match="seq_len"):
        demo.run_demo(seq_len=8)


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out
