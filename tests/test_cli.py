"""What `import causalattn` and the command line cost: the transformers backend is registered without
`import causalattn.hf`, yet neither the import nor `--help` loads transformers' model code."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_causalattn_registers_the_backend():
    # one fresh interpreter (~5 s of transformers' model code); the other order, transformers' model code
    # loaded first, takes the plain `import causalattn.hf` branch of causalattn.hf_autoregister.install
    out = run_python("import causalattn, transformers, sys\n"
                     "print('transformers.modeling_utils' in sys.modules)\n"
                     "from transformers import AttentionInterface\n"
                     "from transformers.masking_utils import AttentionMaskInterface\n"
                     "print('causalattn' in AttentionInterface._global_mapping, "
                     "'causalattn' in AttentionMaskInterface._global_mapping)")
    assert out.split() == ["False", "True", "True"]


def test_help_does_not_load_transformers():
    out = run_python("import sys\nfrom causalattn.lab.cli import main\n"
                     "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
                     "print('MODULES', 'transformers' in sys.modules, 'causalattn.lab.training.loop' in sys.modules)")
    assert "--eval-data" in out and "--strict" in out
    assert out.split("MODULES")[1].split() == ["False", "False"]
