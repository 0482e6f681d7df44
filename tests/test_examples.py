"""The example scripts run and do what their docstrings say."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy_single_layer_learns_to_attend_to_the_cause():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU backend a user gets
    env["OMP_NUM_THREADS"] = "1"  # tiny tensors: a second thread only adds contention on a shared machine
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "toy_single_layer.py")], capture_output=True,
                            text=True, env=env, timeout=300, check=True)
    last = result.stdout.strip().splitlines()[-1]
    attention, accuracy = map(float, re.search(r"attention on cause (\S+)\s+copy accuracy (\S+)", last).groups())
    assert attention > 0.5 and accuracy > 0.9, result.stdout


def test_readme_op_example_runs_and_prints_what_it_says(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as for a user ("auto" is the composed backend on CPU)
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert "causalattn.attention(" in block
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = [line.split("# ", 1)[1].split("<-")[0].strip() for line in block.splitlines()
                if line.startswith("# torch.Size") or line.startswith("# tensor(")]
    assert [line.strip() for line in printed] == expected
