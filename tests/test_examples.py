"""The example scripts run and do what their docstrings say."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy_single_layer_learns_to_attend_to_the_cause():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU reference backend
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "toy_single_layer.py")], capture_output=True,
                            text=True, env=env, timeout=300, check=True)
    last = result.stdout.strip().splitlines()[-1]
    attention, accuracy = map(float, re.search(r"attention on cause (\S+)\s+copy accuracy (\S+)", last).groups())
    assert attention > 0.5 and accuracy > 0.9, result.stdout
