"""Progress lines: one JSON object per line, for the worker that spawned us and for OUTDIR/metrics.jsonl.

The worker parses these lines while the job runs, and metrics.jsonl keeps the
same record next to the checkpoints, so a run can be inspected after the fact.
Events and their keys (the worker depends on them):

    started     resumed_from_step, total_steps, trainable_params, total_params, device, gpus, train_rows, eval_rows
    step        step, epoch, train_loss, learning_rate, tokens_per_sec, tokens_seen, mfu, gpu_memory_mb,
                cpu_memory_mb
    eval        step, eval_loss, eval_accuracy
    checkpoint  step, path (relative to OUTDIR; see checkpoint.py for what it holds)
    artifact    kind ("adapter": the method's artifact; "merged": a standalone merged model), path
    finished    steps, train_loss, eval_loss, eval_accuracy, eval_f1, perplexity, wall_time_s,
                trainable_params, total_params, tokens_per_sec, mfu, peak_memory_mb, artifact_bytes,
                latency_ms, latency_merged_ms, reference_loss_before, reference_loss_after
                (the forgetting check: the loss on the reference set before and after; null without one)
    paused      step, path (of the checkpoint just saved at that step); the last line of a paused run
    log         message
    error       message

resumed_from_step is 0 for a fresh run; a resumed run's steps continue from it,
up to total_steps, and its finished train_loss, tokens_per_sec and wall_time_s
take in the steps and the time before the checkpoint.

tokens_per_sec counts real (not padding) tokens of all GPUs; mfu is the share of
the GPUs' dense bf16 peak that 4·N FLOPs per token (6·N for full fine-tuning,
N = the linear layers' weights) make of it: null on a CPU or a GPU speed.py
does not know. gpus is the number of training processes on GPUs (0 on a CPU).

Memory figures are peaks so far (GPU: torch's allocations; CPU: the process's
resident size); gpu_memory_mb is null when training on the CPU.
"""

import json
import math

METRICS_FILE = "metrics.jsonl"


class Progress:
    def __init__(self, stream, metrics_path=None):
        self.stream = stream
        self.metrics_path = metrics_path  # set once OUTDIR exists

    def emit(self, event, **fields):
        line = json.dumps({"event": event, **{key: _json_number(value) for key, value in fields.items()}})
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as file:
                file.write(line + "\n")

    def log(self, message):
        self.emit("log", message=message)


def _json_number(value):
    # A diverging run yields nan or inf, which json.dumps would write as bare NaN:
    # not JSON, and the worker's parser would reject the whole line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
