"""python -m workers.training SPEC.json OUTDIR

Runs one training job, with no web app, database or broker. SPEC.json holds a
jobs.spec.TrainingRun. Stdout carries only JSON progress lines (see
progress.py); everything else, library chatter included, goes to stderr.
Exit status 0 when the job finished or paused, 1 when it failed (after an "error" line).

Pausing: SIGUSR1, or a file named PAUSE in OUTDIR (which reaches every process
of a multi-GPU run under `accelerate launch`, where a signal would kill the
launcher). The step in progress completes, a checkpoint is saved at it, a
"paused" line names it, and the process exits 0 with no artifact and no
"finished" line; TrainingRun.resume_from set to that checkpoint continues the
job. SIGTERM cancels: the process dies at once, as by default.

Under `accelerate launch`, only the first process (RANK 0) writes progress lines.
"""

import argparse
import os
import resource
import signal
import sys
import threading
import traceback
from pathlib import Path

from pydantic import ValidationError

from jobs.spec import TrainingRun
from workers.training.progress import METRICS_FILE, Progress


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m workers.training", description="Run one fine-tuning job.")
    parser.add_argument("spec", type=Path, help="JSON file holding a jobs.spec.TrainingRun")
    parser.add_argument("outdir", type=Path, help="directory for checkpoints, metrics and artifacts")
    args = parser.parse_args(argv)
    # Installed before anything slow: until then SIGUSR1 would kill the process, as it does by default.
    pause_requested = threading.Event()
    signal.signal(signal.SIGUSR1, lambda signum, frame: pause_requested.set())
    limit_memory(os.environ.get(MEMORY_LIMIT_VARIABLE))

    # Keep the real stdout for progress only, and send fd 1 to stderr so that
    # whatever a library prints cannot break the worker's line parser.
    sys.stdout.flush()
    first_process = int(os.environ.get("RANK", "0")) == 0
    progress_stream = os.fdopen(os.dup(1), "w", encoding="utf-8") if first_process else open(os.devnull, "w")
    os.dup2(2, 1)
    progress = Progress(progress_stream)

    try:
        run = TrainingRun.model_validate_json(args.spec.read_text(encoding="utf-8"))
        args.outdir.mkdir(parents=True, exist_ok=True)
        if first_process:
            progress.metrics_path = args.outdir / METRICS_FILE
        # Imported after the redirection (importing torch and transformers can print)
        # and after the spec is read, so that a bad spec fails in a blink.
        from workers.training.loop import train

        train(run, args.outdir, progress, pause_requested)
    except Exception as error:
        traceback.print_exc()  # the whole story, for the worker's log
        progress.emit("error", message=describe(error))
        return 1
    return 0


MEMORY_LIMIT_VARIABLE = "TUNEDECK_TRAINER_MEMORY_LIMIT_MB"
WHAT_TO_TRY = (
    "try QLoRA (a 4-bit base), a smaller batch_size, a shorter max_seq_length, or gradient_checkpointing"
)


def limit_memory(megabytes):
    """Cap the trainer's address space, so that running out of memory is an error we can explain,
    not the kernel's OOM killer taking the worker or its neighbours down."""
    if megabytes:
        limit = int(megabytes) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def describe(error):
    """A one-paragraph message for the user, naming what to change where that is known."""
    if isinstance(error, ValidationError):
        problems = [
            ": ".join(filter(None, [".".join(str(part) for part in problem["loc"]), problem["msg"]]))
            for problem in error.errors()
        ]
        return "invalid training spec: " + "; ".join(problems)
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return f"out of GPU memory: {WHAT_TO_TRY}. ({str(error).splitlines()[0]})"
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error):
        limit = os.environ.get(MEMORY_LIMIT_VARIABLE)
        within = f" within the worker's limit of {limit} MB" if limit else ""
        return f"out of CPU memory{within}: {WHAT_TO_TRY}."
    if isinstance(error, (ValueError, FloatingPointError, FileNotFoundError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
