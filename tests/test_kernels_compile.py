"""Every fused-attention kernel variant compiles for sm_90 and fits its shared memory, checked on a
machine without a GPU (the interpreter-run tests never invoke the compiler)."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's compiler ships for Linux")
def test_all_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_kernels.py")], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "kernel variants compiled for cuda sm_90" in result.stdout
