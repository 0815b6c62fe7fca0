"""A stand-in for `python -m workers.training SPEC OUTDIR` that speaks the engine's progress protocol.

Run as a script by tests of workers/runner.py, so the runner's side (spawning, reading the lines,
asking for a pause, storing what the lines say) is tested without training anything. It writes
what it was started with to OUTDIR/launch.json, and OUTDIR/SIGUSR1 when that signal arrives.

FAKE_TRAINER_MODE=finish: a few steps, an adapter and "finished". FAKE_TRAINER_MODE=pause: steps
until OUTDIR/PAUSE appears (the engine's pause request), then "paused" and exit 0.
FAKE_TRAINER_MODE=launcher: like torch's launcher, start a "rank" in a session of its own (its pid in
OUTDIR/rank.pid) that prints steps for up to RANK_SECONDS and shrugs off SIGTERM, and wait for it.
FAKE_TRAINER_MODE=orphan: start such a rank, then die a second later as a killed launcher would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WAIT_FOR_PAUSE_SECONDS = 60
RANK_SECONDS = 30


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def step_line(step):
    emit("step", step=step, epoch=step / 10, train_loss=2.0 - step / 10, learning_rate=1e-3,
         tokens_per_sec=1000.0 + step, mfu=round(0.4 + step / 100, 4), tokens_seen=64 * step, gpu_memory_mb=None,
         cpu_memory_mb=300.0)


def main(spec_path, outdir):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGUSR1, lambda *_: (outdir / "SIGUSR1").touch())
    (outdir / "launch.json").write_text(json.dumps({
        "argv": sys.argv,
        "env": {name: os.environ.get(name) for name in
                ("CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
    }))
    emit("started", resumed_from_step=0, total_steps=100, trainable_params=10, total_params=1000, device="cpu",
         train_rows=8, eval_rows=0)
    if os.environ.get("FAKE_TRAINER_MODE") in ("launcher", "orphan"):
        rank = subprocess.Popen([sys.executable, __file__, "--rank", str(outdir)], start_new_session=True)
        if os.environ["FAKE_TRAINER_MODE"] == "orphan":
            time.sleep(1)
            os._exit(1)
        return rank.wait()
    if os.environ.get("FAKE_TRAINER_MODE") == "pause":
        deadline = time.monotonic() + WAIT_FOR_PAUSE_SECONDS
        step = 0
        while not (outdir / "PAUSE").exists():
            if time.monotonic() > deadline:
                emit("error", message="no PAUSE file came")
                return 1
            step += 1
            step_line(step)
            time.sleep(0.05)
        emit("paused", step=step, path=f"checkpoint-{step}")
        return 0
    for step in range(1, 4):
        step_line(step)
    adapter = outdir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    emit("artifact", kind="adapter", path="adapter")
    emit("finished", steps=3, train_loss=1.7, eval_loss=None, eval_accuracy=None, wall_time_s=1.5,
         trainable_params=10, total_params=1000, tokens_per_sec=1001.5, mfu=0.412, peak_memory_mb=300.0,
         artifact_bytes=2)
    return 0


def rank(outdir):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank stuck in a collective: only SIGKILL ends it
    (Path(outdir) / "rank.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + RANK_SECONDS
    step = 0
    while time.monotonic() < deadline:
        step += 1
        step_line(step)
        time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        sys.exit(rank(sys.argv[2]))
    sys.exit(main(*sys.argv[1:3]))
