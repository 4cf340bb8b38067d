"""Independent work in worker processes, with the results it gives in this process.

`map_fork(fn, items, workers)` is ``[fn(x) for x in items]``, run by up to `workers` forked
copies of this process (Linux's fork start method). A worker inherits `fn` and `items` as they
are here (loaded models included: nothing is pickled or reloaded on the way in); only the
results travel back, pickled, in the order of `items`. An exception in a worker is raised here.
Each worker runs torch, and the BLAS and OpenMP pools of numpy, scipy and scikit-learn, on one
thread: work that pins torch to one thread itself (the probes' ``threads=1``) computes there
exactly what it computes here, the same operations on the same inputs in the same order; for
other work, the caller checks that the thread count does not change its results. Without fork,
with CUDA initialized (a forked child cannot use it), or with one worker or one item, everything
runs here.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

_JOBS: dict[int, tuple[Callable[[Any], Any], list[Any]]] = {}  # read by the forked workers
_KEYS = itertools.count()


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _one_thread() -> None:
    """torch, and the BLAS and OpenMP pools numpy, scipy and scikit-learn call, on one thread:
    a worker's idle pool threads spin for a while after each call, on the cores the other
    workers need (the real-traces study's four token workers on two cores: 1.9x its time)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # the pools loaded already; called, not entered: for the worker's life
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"  # those loaded later


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


def _run(key: int, i: int) -> Any:
    fn, items = _JOBS[key]
    return fn(items[i])


def map_fork(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1) -> list[Any]:
    """``[fn(x) for x in items]``, in up to `workers` forked processes (module doc)."""
    items = list(items)
    n = min(int(workers), len(items))
    if n <= 1 or "fork" not in mp.get_all_start_methods() or _cuda_initialized():
        return [fn(x) for x in items]
    from concurrent.futures import ProcessPoolExecutor

    key = next(_KEYS)
    _JOBS[key] = (fn, items)  # before the workers fork (at the first task)
    # tokenizers warns in a forked child of a process that tokenized in parallel, unless this is set
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(n, mp_context=mp.get_context("fork"), initializer=_one_thread) as ex:
            return list(ex.map(partial(_run, key), range(len(items))))
    finally:
        del _JOBS[key]
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


__all__ = ["available_cores", "map_fork"]
