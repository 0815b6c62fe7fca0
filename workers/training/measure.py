"""What a finished job records for the compare page, beyond the losses: memory, perplexity, size, latency."""

import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

LATENCY_WARMUP_RUNS = 2  # the first calls pay for allocations and kernel choices, not for the model
LATENCY_RUNS = 5


def peak_memory_mb():
    """GPU: the most torch has had allocated; CPU: the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_cpu_memory_mb()


def peak_cpu_memory_mb():
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def perplexity(eval_loss):
    """exp of the mean per-token loss; inf (null in the progress line) where that overflows."""
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return math.inf


def size_on_disk(directory):
    """Bytes in the files under `directory`."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


@torch.no_grad()
def latency_ms(model, batch):
    """The median time of one forward pass over `batch` (labels left out), after warm-up runs."""
    model.eval()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    timings = []
    for _ in range(LATENCY_WARMUP_RUNS + LATENCY_RUNS):
        _wait_for_gpu()
        start = time.perf_counter()
        model(**inputs)
        _wait_for_gpu()  # GPU kernels run asynchronously: without this we would time the launch only
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[LATENCY_WARMUP_RUNS:]) * 1000


def _wait_for_gpu():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
