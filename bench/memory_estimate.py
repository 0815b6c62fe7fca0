"""The memory estimate against measured peaks: real training runs of the engine on a GPU.

    python bench/memory_estimate.py [--out DIR] [--only NAME ...]

Builds Llama-shaped models with random weights (a 1B shape with Llama 3's 128k
vocabulary, and a 0.5B shape with a 32k one), runs the engine as a worker does
(`python -m workers.training SPEC OUTDIR`) for a few steps per configuration,
with every sequence as long as max_seq_length so each batch is the worst case
the estimate plans for, and compares the trainer's peak
(torch.cuda.max_memory_allocated) with workers.training.memory_estimate.
Prints a table; writes the figures to OUT/memory_estimate.json.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.spec import JobSpec, TrainingRun  # noqa: E402
from workers.training.catalogue import describe_model  # noqa: E402
from workers.training.memory_estimate import estimate_peak_memory  # noqa: E402
from workers.training.tiny_model import build_random_llama  # noqa: E402

SHAPES = {
    "llama-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=4096), 128256),
    "llama-0.5b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=4096), 32000),
}
ALL_LINEAR = {"target_modules": "all_linear"}
# name: (shape, method, batch_size, max_seq_length[, more hyperparameters])
CONFIGURATIONS = {
    "lora-qv-b8-s512": ("llama-1b", {"type": "lora"}, 8, 512),
    "lora-all-b8-s1024": ("llama-1b", {"type": "lora", **ALL_LINEAR}, 8, 1024),
    "lora-all-b2-s256": ("llama-1b", {"type": "lora", **ALL_LINEAR}, 2, 256),
    "lora-all-nodrop-b4-s1024": ("llama-1b", {"type": "lora", "dropout": 0, **ALL_LINEAR}, 4, 1024),
    "qlora-all-b8-s1024": ("llama-1b", {"type": "qlora", **ALL_LINEAR}, 8, 1024),
    "qlora-qv-b4-s512": ("llama-1b", {"type": "qlora"}, 4, 512),
    "dora-qv-b4-s512": ("llama-1b", {"type": "dora"}, 4, 512),
    "full-b4-s512": ("llama-1b", {"type": "full"}, 4, 512),
    "adapter-b8-s512": ("llama-1b", {"type": "adapter"}, 8, 512),
    "ia3-b8-s512": ("llama-1b", {"type": "ia3"}, 8, 512),
    "prompt-b8-s512": ("llama-1b", {"type": "prompt"}, 8, 512),
    "0.5b-lora-all-b16-s512": ("llama-0.5b", {"type": "lora", **ALL_LINEAR}, 16, 512),
    "0.5b-full-b8-s512": ("llama-0.5b", {"type": "full"}, 8, 512),
    "0.5b-qlora-all-b16-s1024": ("llama-0.5b", {"type": "qlora", **ALL_LINEAR}, 16, 1024),
    "lora-all-gc-b8-s1024": ("llama-1b", {"type": "lora", **ALL_LINEAR}, 8, 1024, {"gradient_checkpointing": True}),
    "full-gc-b8-s1024": ("llama-1b", {"type": "full"}, 8, 1024, {"gradient_checkpointing": True}),
}
# Far beyond one GPU: the job must fail with the out-of-memory message, not crash the trainer.
TOO_LARGE = ("llama-1b", {"type": "full"}, 64, 4096)
STEPS = 3


def write_dataset(path, rows, length):
    rng = random.Random(0)
    with open(path, "w") as file:
        for _ in range(rows):
            completion = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length + 16))
            file.write(json.dumps({"prompt": "Q:", "completion": completion}) + "\n")
    return path


def measure(name, workdir, models, configuration=None):
    shape_name, method, batch_size, max_seq_length, *more = configuration or CONFIGURATIONS[name]
    model_path = models[shape_name]
    spec = JobSpec(
        base_model=shape_name, dataset=1, method=method,
        hyperparameters={"batch_size": batch_size, "max_seq_length": max_seq_length, "max_steps": STEPS,
                         "eval_fraction": 0, "checkpoint_every": 1000, "learning_rate": 1e-4, **(more[0] if more else {})},
    )
    estimate = estimate_peak_memory(describe_model(model_path), spec, "cuda")
    run_dir = workdir / name
    run_dir.mkdir()
    dataset = write_dataset(run_dir / "data.jsonl", batch_size * STEPS, max_seq_length)
    run = TrainingRun(spec=spec, model_path=str(model_path), dataset_path=str(dataset), dataset_format="prompt_completion")
    (run_dir / "spec.json").write_text(run.model_dump_json())
    finished = error = None
    process = subprocess.run(
        [sys.executable, "-m", "workers.training", str(run_dir / "spec.json"), str(run_dir / "out")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    for line in process.stdout.splitlines():
        event = json.loads(line)
        if event["event"] == "finished":
            finished = event
        elif event["event"] == "error":
            error = event["message"]
    if finished is None:
        return {"name": name, "error": error or process.stderr[-2000:]}
    measured = finished["peak_memory_mb"]
    return {
        "name": name,
        "estimate_mb": estimate.total_mb,
        "measured_mb": round(measured),
        "error_percent": round(100 * (estimate.total_mb - measured) / measured, 1),
        "parts_mb": {part: round(size) for part, size in estimate.parts_mb.items()},
        "tokens_per_sec": round(finished["tokens_per_sec"]),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--only", nargs="*", default=list(CONFIGURATIONS))
    parser.add_argument("--too-large", action="store_true", help="also run a job no GPU holds and show its error")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="memory-estimate-"))
    models = {
        shape: build_random_llama(workdir / "models" / shape, config, dtype=torch.bfloat16, vocab_size=vocab)
        for shape, (config, vocab) in SHAPES.items()
        if any(CONFIGURATIONS[name][0] == shape for name in args.only) or (args.too_large and shape == TOO_LARGE[0])
    }
    results = []
    for name in args.only:
        result = measure(name, workdir, models)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.too_large:
        result = measure("too-large", workdir, models, TOO_LARGE)
        print(json.dumps(result), flush=True)
        results.append(result)
    (args.out / "memory_estimate.json").write_text(json.dumps(results, indent=2))

    print(f"\n{'configuration':28} {'estimate MiB':>12} {'measured MiB':>12} {'error':>7}")
    for result in results:
        if "error" in result:
            print(f"{result['name']:28} failed: {result['error'][:200]}")
        else:
            print(f"{result['name']:28} {result['estimate_mb']:12,} {result['measured_mb']:12,} "
                  f"{result['error_percent']:+6.1f}%")
    errors = [abs(result["error_percent"]) for result in results if "error_percent" in result]
    if errors:
        print(f"\nabsolute error: median {statistics.median(errors):.1f}%, max {max(errors):.1f}%")


if __name__ == "__main__":
    main()
