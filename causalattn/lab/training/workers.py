"""Worker processes for a job of several units: the embedded bases' builds and the (base, seed) units
spread over `--workers` processes, each on one CPU thread.

The embedded model is too small to share one step between threads (on a busy 2-core machine a step took
0.19 s on one thread and 3.8 s on two), so a job's parallelism is across units: each unit computes in a
worker exactly what it computes in the main process (every run seeds itself, one thread each), and the
numbers do not depend on the number of workers. Workers are spawned, not forked: a forked child would
inherit the parent's torch thread pools and any process group.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Sequence, TypeVar

import torch

from causalattn.lab.training import tiny

T = TypeVar("T")


def _start_worker() -> None:
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker)


def log_line(message: str) -> None:
    """A worker's progress line: printed at once, so it shows when stdout is a pipe or a file."""
    print(message, flush=True)


def _build(settings: tiny.TinyBaseSettings) -> None:
    tiny.ensure_tiny_base(settings, show_progress=False, log=log_line)


def build_bases(settings: Sequence[tiny.TinyBaseSettings], workers: int) -> None:
    """Build (into the cache) every base of `settings`, `workers` at a time."""
    with _pool(min(workers, len(settings))) as pool:
        for future in as_completed([pool.submit(_build, each) for each in settings]):
            future.result()


def map_units(function: Callable[..., T], arguments: Sequence[tuple[Any, ...]], workers: int) -> list[T]:
    """[function(*args) for args in arguments], `workers` at a time, in the order of `arguments`."""
    with _pool(min(workers, len(arguments))) as pool:
        futures = [pool.submit(function, *args) for args in arguments]
        return [future.result() for future in futures]
