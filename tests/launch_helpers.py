"""Starting the multi-process tests' workers: a free port for the rendezvous and the environment that
makes each worker a CPU process running this checkout."""
import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_workers(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher command on CPUs (no GPU visible, one thread per process: the workers share the
    machine), with this checkout and tests/ importable; fails the test with the workers' stderr (with each
    thread's Python stack when a worker dies of a signal)."""
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a worker killed by a signal prints where it was
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done
