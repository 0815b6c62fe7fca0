"""Training speed (issue 7): the TuneDeck engine against transformers.Trainer + peft, on the same GPU run.

    python bench/train_speed.py [--out DIR] [--modes lora full qlora] [--reps 3] [--steps 30] [--warmup 5]
                                [--profile] [--shape llama-1b|llama-8b] [--batch-size 8] [--gpus 1 2] [--no-baseline]

The workload is issue 7's: a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads,
8 KV heads, FFN 8192, vocabulary 128256, tied embeddings) with random bf16 weights, and
sequences of random tokens whose lengths are lognormal (median 256, mean about 330),
clipped to 32-1024, drawn with one seed for both sides.

Both sides train on the very same token ids, in the same batches of 8, in the same order:
each sequence is written as a `text` row of random ASCII, which the model's byte-level
tokenizer turns into <s> + one token per character + </s> (the engine's tokenization of a
text row); the baseline gets the ids of the same rows from the same tokenizer (`tokenizer(text)`
plus eos, as a user writes it) in the engine's shuffle order, and the engine's tokens_seen is
checked against the batches' real token counts, so both count the same real (non-padding)
tokens per optimizer step.

- ours: the engine as a worker runs it (`python -m workers.training SPEC OUTDIR`); per-step
  timings and the peak GPU memory come from its JSON progress lines.
- baseline: what a user writes from the transformers and peft docs: `Trainer`, batch 8,
  `DataCollatorForLanguageModeling` (padding to the longest in the batch), SDPA attention,
  `bf16=True`; LoRA on a bf16 base via `get_peft_model`; full fine-tuning on float32 weights
  (bf16 autocast: mixed precision); QLoRA with `BitsAndBytesConfig` (NF4, double quant) and
  `prepare_model_for_kbit_training`. A callback synchronises the GPU at each step's end.

Each repetition is a fresh process (one per side and mode), the first --warmup steps are
dropped, and tokens/s is the real tokens over the time of the remaining steps. The table
shows the median over repetitions and the spread (min-max). MFU counts 4·N FLOPs per token
for LoRA/QLoRA (forward, and the backward to activations only) and 6·N for full fine-tuning,
N = the matmul parameters including the LM head, against 989 TFLOP/s (H100 dense bf16).
--profile adds a torch.profiler breakdown of the engine's LoRA step by kernel kind.
Both sides record every step's loss; the JSON compares the curves (same seed, same batches).
--gpus 1 2 runs our side on 1 and on 2 GPUs (`accelerate launch`, DDP: each GPU its own
batches of --batch-size rows), for the multi-GPU scaling; --shard shards the weights there
(FSDP), as for a job one GPU cannot hold; --no-baseline skips the baseline.
--variant NAME:KEY=VALUE,... runs our side once more with those environment variables (e.g.
eager:TUNEDECK_COMPILE=0), to measure one part of the engine against the rest in the same call.
Our side compiles, as the engine does by default for a job long enough to repay compiling (some
4,000 steps of this benchmark on an H100): the runs here are that job's first steps. A job as short
as these runs trains eagerly by default; eager:TUNEDECK_COMPILE=0 measures that.
Writes OUT/train_speed.json (rewritten after every repetition) and prints a table last.
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=4096), 128256),
    "llama-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=4096), 128256),
    # For a quick run of the harness on a CPU; its figures mean nothing.
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024), 1024),
}
BATCH_SIZE = 8
MIN_LENGTH, MAX_LENGTH, MEDIAN_LENGTH, SIGMA = 32, 1024, 256, 0.75  # sigma 0.75: mean ≈ 330 after clipping
LORA = dict(r=16, alpha=32, dropout=0.05)
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
DATA_SEED, TRAIN_SEED = 0, 42
ALPHABET = [chr(code) for code in range(33, 127)]  # printable ASCII, one byte token each
LOG_DIR = Path("bench/out")  # --out: where the engine's progress and stderr are written
# Our side's steps as a long job's: compiled (speed.compile_in_place), though these runs are short.
LONG_JOB = {"TUNEDECK_COMPILE": "default"}


# --- the workload ---

def sequence_lengths(count, seed=DATA_SEED):
    """Token counts per sequence (with <s> and </s>): lognormal, median 256, clipped to 32-1024."""
    rng = random.Random(seed)
    return [min(MAX_LENGTH, max(MIN_LENGTH, round(rng.lognormvariate(math.log(MEDIAN_LENGTH), SIGMA))))
            for _ in range(count)]


def write_dataset(path, lengths, seed=DATA_SEED):
    """One `text` row per sequence: length - 2 random characters (the tokenizer adds <s> and </s>)."""
    rng = random.Random(seed + 1)
    texts = ["".join(rng.choices(ALPHABET, k=length - 2)) for length in lengths]
    # A special token's text drawn by chance ("<s>" once in some 1,400 rows) would be read as that one token.
    from workers.training.tiny_model import SPECIAL_TOKENS

    for special in SPECIAL_TOKENS.values():
        texts = [text.replace(special, "[" + special[1:]) for text in texts]
    with open(path, "w") as file:
        for text in texts:
            file.write(json.dumps({"text": text}) + "\n")
    return texts


def engine_order(count, seed=TRAIN_SEED):
    """The rows in the order of the engine's first epoch: its train/eval split shuffles them with the seed
    (even with nothing held out), then EpochShuffle orders the training rows for epoch 0."""
    from workers.training.data import EpochShuffle, split_train_eval

    train_rows, _ = split_train_eval(list(range(count)), 0, seed)
    return [train_rows[index] for index in EpochShuffle(len(train_rows), seed)]


def matmul_parameters(shape, vocab):
    """N: the weights every token multiplies through (all linears of the layers, and the LM head)."""
    hidden, ffn = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    return shape["num_hidden_layers"] * per_layer + vocab * hidden


# --- our side: the engine, as a worker runs it ---

def engine_method(mode):
    if mode == "full":
        return {"type": "full"}
    return {"type": mode, **LORA, "target_modules": "all_linear"}


def run_engine(mode, workdir, model_path, dataset_path, rows, steps, rep, gpus=1, variant=None, shard=False):
    from jobs.spec import JobSpec, TrainingRun

    spec = JobSpec(
        base_model="llama-1b", dataset=1, method=engine_method(mode),
        hyperparameters={"batch_size": BATCH_SIZE, "max_seq_length": MAX_LENGTH, "max_steps": steps,
                         "eval_fraction": 0, "checkpoint_every": 1_000_000, "learning_rate": 1e-4,
                         "seed": TRAIN_SEED},
    )
    run_dir = workdir / f"engine-{mode}-{rep}-{gpus}gpu" if variant is None else workdir / f"engine-{mode}-{rep}-{variant[0]}"
    run_dir.mkdir(parents=True)
    run = TrainingRun(spec=spec, model_path=str(model_path), dataset_path=str(dataset_path), dataset_format="text",
                      shard_weights=shard and gpus > 1)
    (run_dir / "spec.json").write_text(run.model_dump_json())
    started = time.perf_counter()
    launcher = [sys.executable]
    if gpus > 1:  # as the worker launches a job that asks for several GPUs
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # The engine's lines go to files under --out as they come, so a run cut short still shows how far it got.
    stdout_path, stderr_path = LOG_DIR / f"{run_dir.name}.progress.jsonl", LOG_DIR / f"{run_dir.name}.stderr.txt"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        subprocess.run(launcher + ["-m", "workers.training", str(run_dir / "spec.json"), str(run_dir / "out")],
                       stdout=stdout, stderr=stderr, text=True, cwd=ROOT,
                       env=LONG_JOB | os.environ | (variant[1] if variant else {}))
    steps_seen, error, previous_seen = [], None, 0
    for line in stdout_path.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "step":
            tokens = event["tokens_seen"] - previous_seen
            previous_seen = event["tokens_seen"]
            steps_seen.append({"tokens": tokens, "seconds": tokens / event["tokens_per_sec"],
                               "peak_mb": event["gpu_memory_mb"], "loss": event["train_loss"]})
        elif event["event"] == "error":
            error = event["message"]
    if len(steps_seen) < steps:
        return {"error": error or stderr_path.read_text()[-3000:]}
    return {"steps": steps_seen, "peak_mb": steps_seen[-1]["peak_mb"], "process_seconds": time.perf_counter() - started}


# --- the baseline: transformers.Trainer + peft, as the docs have it ---

def baseline_worker(job):
    """One repetition of the baseline in this process; prints one JSON line."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    mode, on_gpu = job["mode"], torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    texts = [json.loads(line)["text"] for line in open(job["dataset_path"])]
    rows = [texts[index] for index in job["order"]]
    train_dataset = [{"input_ids": tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]} for text in rows]

    model_kwargs = {"attn_implementation": "sdpa"}
    if mode == "lora":
        model_kwargs["dtype"] = torch.bfloat16
    elif mode == "full":
        model_kwargs["dtype"] = torch.float32  # master weights in fp32, bf16 autocast: mixed precision
    elif mode == "qlora":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model_kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], **model_kwargs)
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if mode == "qlora":
            model = prepare_model_for_kbit_training(model)
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))

    step_ends, losses = [], []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class SameOrderTrainer(Trainer):
        # The one departure from the docs: the rows in the engine's order, so both sides train on the same batches.
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    arguments = TrainingArguments(
        output_dir=job["outdir"], per_device_train_batch_size=BATCH_SIZE, max_steps=job["steps"], learning_rate=1e-4,
        bf16=on_gpu, logging_steps=1, save_strategy="no", report_to="none", seed=TRAIN_SEED,
        use_cpu=not on_gpu,
    )
    trainer = SameOrderTrainer(model=model, args=arguments, train_dataset=train_dataset,
                               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                               callbacks=[StepTimer()])
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    real = [len(row["input_ids"]) for row in train_dataset]
    times = [end - begin for begin, end in zip([start] + step_ends[:-1], step_ends)]
    steps = [{"tokens": sum(real[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]), "seconds": seconds, "loss": loss}
             for i, (seconds, loss) in enumerate(zip(times, losses))]
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    print("RESULT " + json.dumps({"steps": steps, "peak_mb": peak}), flush=True)


def run_baseline(mode, workdir, model_path, dataset_path, order, steps, rep):
    job = {"mode": mode, "model_path": str(model_path), "dataset_path": str(dataset_path), "order": order,
           "steps": steps, "outdir": str(workdir / f"baseline-{mode}-{rep}"), "batch_size": BATCH_SIZE,
           "lora_dropout": LORA["dropout"]}
    job_path = workdir / f"baseline-{mode}-{rep}.json"
    job_path.write_text(json.dumps(job))
    started = time.perf_counter()
    process = subprocess.run([sys.executable, __file__, "--baseline-worker", str(job_path)],
                             capture_output=True, text=True, cwd=ROOT)
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "process_seconds": time.perf_counter() - started}
    return {"error": process.stderr[-3000:]}


# --- a profile of the engine's LoRA step ---

KERNEL_KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "splitk")),
    ("loss (log-softmax, NLL)", ("log_softmax", "softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("dropout", ("dropout", "masked_scale")),
    ("copies and dtype casts", ("copy", "cast", "convert")),
    ("reductions", ("reduce",)),
]


def profile_worker(job):
    """Train the engine in this process under torch.profiler; print the GPU time per kernel kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from jobs.spec import TrainingRun
    from workers.training.loop import train
    from workers.training.progress import Progress

    run = TrainingRun.model_validate_json(Path(job["spec"]).read_text())
    step_ends = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 schedule=schedule(wait=2, warmup=2, active=job["active"])) as profiler:
        class StepStream:  # the engine's progress lines; each step line advances the profiler
            def write(self, text):
                for line in text.splitlines():
                    if line.startswith('{"event": "step"'):
                        step_ends.append(time.perf_counter())
                        profiler.step()

            def flush(self):
                pass

        train(run, job["outdir"], Progress(StepStream()))
    kernels, launches = {}, {}
    short_launches, short_micros = 0, 0.0  # kernels too small to fill the GPU: what fusing kernels would save
    for event in profiler.events():
        # GPU-side annotations (ProfilerStep#n, Optimizer.step#...) span kernels; they are not kernels.
        annotation = getattr(event, "is_user_annotation", False) or "#" in event.name or event.name.startswith("ProfilerStep")
        if event.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            kernels[event.name] = kernels.get(event.name, 0) + event.time_range.elapsed_us()
            launches[event.name] = launches.get(event.name, 0) + 1
            if event.time_range.elapsed_us() < 5:
                short_launches += 1
                short_micros += event.time_range.elapsed_us()
    kinds = {}
    for name, micros in kernels.items():
        lowered = name.lower()
        kind = next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)),
                    "other elementwise")
        kinds[kind] = kinds.get(kind, 0) + micros
    total = sum(kinds.values())
    top = sorted(kernels.items(), key=lambda item: -item[1])[:40]
    # The matmuls by their operands' shapes: which layer's product the GPU's time goes to.
    matmuls = [average for average in profiler.key_averages(group_by_input_shape=True)
               if average.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")]
    matmuls.sort(key=lambda average: -average.device_time_total)
    print("RESULT " + json.dumps({
        "active_steps": job["active"], "gpu_ms_per_step": total / 1000 / job["active"],
        # Wall time of the profiled steps (the profiler slows them a little): kernels over wall = GPU busy.
        "step_wall_ms_profiled": 1000 * statistics.median(b - a for a, b in zip(step_ends[4:], step_ends[5:])),
        "kinds_percent": {kind: round(100 * micros / total, 1) for kind, micros in sorted(kinds.items(), key=lambda i: -i[1])},
        "top_kernels": [{"name": name[:120], "percent": round(100 * micros / total, 1),
                         "launches_per_step": launches[name] / job["active"]} for name, micros in top],
        "kernels_per_step": sum(launches.values()) / job["active"],
        "kernels_under_5us_per_step": {"launches": short_launches / job["active"],
                                       "ms": short_micros / 1000 / job["active"]},
        "top_matmuls": [{"op": average.key, "shapes": str(average.input_shapes),
                         "calls_per_step": average.count / job["active"],
                         "ms_per_step": average.device_time_total / 1000 / job["active"],
                         "percent": round(100 * average.device_time_total / total, 1)} for average in matmuls[:40]],
    }), flush=True)


def run_profile(workdir, model_path, dataset_path):
    from jobs.spec import JobSpec, TrainingRun

    active = 4
    spec = JobSpec(base_model="llama-1b", dataset=1, method=engine_method("lora"),
                   hyperparameters={"batch_size": BATCH_SIZE, "max_seq_length": MAX_LENGTH, "max_steps": 4 + active + 1,
                                    "eval_fraction": 0, "checkpoint_every": 1_000_000, "seed": TRAIN_SEED})
    run = TrainingRun(spec=spec, model_path=str(model_path), dataset_path=str(dataset_path), dataset_format="text")
    (workdir / "profile-spec.json").write_text(run.model_dump_json())
    job = {"spec": str(workdir / "profile-spec.json"), "outdir": str(workdir / "profile-out"), "active": active}
    (workdir / "profile.json").write_text(json.dumps(job))
    process = subprocess.run([sys.executable, __file__, "--profile-worker", str(workdir / "profile.json")],
                             capture_output=True, text=True, cwd=ROOT, env=LONG_JOB | os.environ)
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": process.stderr[-3000:]}


# --- figures ---

def summarise(repetition, warmup, flops_per_token):
    if "error" in repetition:
        return repetition
    measured = repetition["steps"][warmup:]
    tokens, seconds = sum(s["tokens"] for s in measured), sum(s["seconds"] for s in measured)
    per_step = statistics.median(s["tokens"] / s["seconds"] for s in measured)
    return {"tokens_per_sec": per_step, "tokens_per_sec_overall": tokens / seconds,
            "step_ms_median": 1000 * statistics.median(s["seconds"] for s in measured),
            "mfu_percent": 100 * flops_per_token * per_step / PEAK_FLOPS, "peak_mb": repetition["peak_mb"],
            "tokens_per_step": tokens / len(measured), "process_seconds": round(repetition["process_seconds"], 1),
            "step_ms": [round(1000 * s["seconds"], 1) for s in repetition["steps"]]}


def summarise_mode(figures):
    for side in [key for key in figures if key.startswith("ours") or key == "baseline"]:
        if key_is_summary(side):
            continue
        good = [r for r in figures[side] if "error" not in r]
        if good:
            figures[side + "_summary"] = {key: median_and_spread([r[key] for r in good])
                                          for key in ("tokens_per_sec", "tokens_per_sec_overall", "step_ms_median",
                                                      "mfu_percent", "peak_mb")
                                          if good[0][key] is not None}
    pairs = [(o["tokens_per_sec"], b["tokens_per_sec"]) for o, b in zip(figures.get("ours", []), figures["baseline"])
             if "error" not in o and "error" not in b]
    if pairs:
        figures["ratio_ours_over_baseline"] = median_and_spread([o / b for o, b in pairs])
    for side in [key for key in figures if key.startswith("ours_") and isinstance(figures[key], list)]:
        pairs = [(o["tokens_per_sec"], b["tokens_per_sec"]) for o, b in zip(figures[side], figures.get("ours", []))
                 if "error" not in o and "error" not in b]
        if pairs:
            figures[f"ratio_{side}_over_ours"] = median_and_spread([o / b for o, b in pairs])


def compare_losses(figures):
    """The loss curves of both sides, step by step: the same batches in the same order, each side its own init draws."""
    ours = next((r["losses"] for r in figures.get("ours", []) if "losses" in r), None)
    baseline = next((r["losses"] for r in figures["baseline"] if "losses" in r), None)
    if ours and baseline:
        differences = [abs(a - b) for a, b in zip(ours, baseline)]
        figures["loss_curves"] = {"ours": ours, "baseline": baseline, "max_abs_difference": max(differences),
                                  "mean_abs_difference": statistics.mean(differences)}


def key_is_summary(key):
    return key.endswith("_summary")


def median_and_spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main():
    global BATCH_SIZE  # --batch-size, or the baseline worker's job, sets it for the whole run
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--modes", nargs="*", default=["lora", "full", "qlora"],
                        help="lora, full, qlora; MODE:REPS:STEPS overrides --reps and --steps for that mode")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per repetition")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each repetition")
    parser.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    parser.add_argument("--profile", action="store_true", help="also profile the engine's LoRA step")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="rows per optimizer step (per GPU)")
    parser.add_argument("--gpus", type=int, nargs="*", default=[1], help="GPU counts to run our side on")
    parser.add_argument("--lora-dropout", type=float, default=LORA["dropout"],
                        help="LoRA's dropout on both sides (issue 7's workload: 0.05), to measure what it costs")
    parser.add_argument("--shard", action="store_true",
                        help="on several GPUs, shard the weights (FSDP), as a worker does for a job one GPU cannot hold")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--model-dir", type=Path, help="build the random model here, or reuse the one already there")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also run our side (1 GPU) with these environment variables, e.g. eager:TUNEDECK_COMPILE=0")
    parser.add_argument("--table-from", type=Path, help="summarise a results JSON (of a run cut short) and print its table")
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        job = json.loads(args.baseline_worker.read_text())
        BATCH_SIZE = job["batch_size"]
        LORA["dropout"] = job["lora_dropout"]
        return baseline_worker(job)
    if args.profile_worker:
        return profile_worker(json.loads(args.profile_worker.read_text()))
    if args.table_from:
        results = json.loads(args.table_from.read_text())
        for figures in results["modes"].values():
            summarise_mode(figures)
        args.table_from.write_text(json.dumps(results, indent=2))
        return print_table(results)

    import torch

    from workers.training.tiny_model import build_random_llama

    BATCH_SIZE = args.batch_size
    LORA["dropout"] = args.lora_dropout
    global LOG_DIR
    LOG_DIR = args.out

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="train-speed-"))
    shape, vocab = SHAPES[args.shape]
    model_path = build_random_llama(args.model_dir or workdir / "model", shape, dtype=torch.bfloat16, vocab_size=vocab)
    plans = [(mode, int(reps or args.reps), int(steps or args.steps))
             for mode, reps, steps in ((text.split(":") + [None, None])[:3] for text in args.modes)]
    total_steps = args.warmup + max(steps for _, _, steps in plans)
    rows = BATCH_SIZE * total_steps * max(args.gpus)
    lengths = sequence_lengths(rows)
    dataset_path = workdir / "data.jsonl"
    write_dataset(dataset_path, lengths)
    order = engine_order(rows)
    ordered = [lengths[index] for index in order]
    batches = [ordered[i:i + BATCH_SIZE] for i in range(0, rows, BATCH_SIZE)]
    n = matmul_parameters(shape, vocab)
    results = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": versions(), "shape": args.shape, "matmul_parameters": n, "batch_size": BATCH_SIZE,
        "gpus": args.gpus, "sharded": args.shard, "lora": LORA,
        "warmup_steps": args.warmup,
        "data": {"rows": rows, "median_length": statistics.median(lengths), "mean_length": statistics.mean(lengths),
                 "real_tokens_per_padded_token": sum(lengths) / sum(max(b) * len(b) for b in batches)},
        "modes": {},
    }
    print(json.dumps(results["data"]), flush=True)

    def save():
        (args.out / "train_speed.json").write_text(json.dumps(results, indent=2))

    for mode, reps, steps in plans:
        flops_per_token = (6 if mode == "full" else 4) * n
        figures = results["modes"][mode] = {"repetitions": reps, "measured_steps": steps, "ours": [], "baseline": []}
        sides = [] if args.no_baseline else [("baseline", 1)]
        sides += [("ours" if gpus == 1 else f"ours_{gpus}gpu", gpus) for gpus in args.gpus]
        variants = {name: dict(pair.split("=", 1) for pair in settings.split(","))
                    for name, settings in (text.split(":", 1) for text in args.variant)}
        sides += [(f"ours_{name}", 1) for name in variants]
        for rep in range(reps):
            for side, gpus in sides:
                if side == "baseline":
                    raw = run_baseline(mode, workdir, model_path, dataset_path, order, args.warmup + steps, rep)
                else:
                    name = side.removeprefix("ours_")
                    variant = (name, variants[name]) if name in variants else None
                    raw = run_engine(mode, workdir, model_path, dataset_path, rows, args.warmup + steps, rep, gpus, variant,
                                     args.shard)
                if "steps" in raw:
                    got = [s["tokens"] for s in raw["steps"]]
                    expected = [sum(sum(batch) for batch in batches[gpus * i:gpus * (i + 1)])
                                for i in range(args.warmup + steps)]
                    # Several GPUs take their batches in turns (accelerate's sharding): the same sums per step.
                    if got != expected:
                        raw = {"error": f"{side} trained on other batches than planned: {got[:5]} vs {expected[:5]}"}
                summary = summarise(raw, args.warmup, flops_per_token / gpus)
                if "steps" in raw:
                    summary["losses"] = [round(s["loss"], 4) for s in raw["steps"]]
                figures.setdefault(side, []).append(summary)
                print(json.dumps({"mode": mode, "side": side, "rep": rep, **summary})[:1500], flush=True)
                save()
        summarise_mode(figures)
        compare_losses(figures)
        save()
        if args.profile and mode == plans[0][0]:  # early, so that a run cut short still has it
            results["engine_lora_profile"] = run_profile(workdir, model_path, dataset_path)
            print(json.dumps(results["engine_lora_profile"]), flush=True)
            save()
    print_table(results)


def versions():
    import importlib.metadata

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def print_table(results):
    profile = results.get("engine_lora_profile")
    if profile and "kinds_percent" in profile:
        print(f"\nengine LoRA step, GPU time by kernel kind ({profile['gpu_ms_per_step']:.0f} ms of kernels in a "
              f"{profile['step_wall_ms_profiled']:.0f} ms step):")
        for kind, percent in profile["kinds_percent"].items():
            print(f"  {kind:28} {percent:5.1f}%")
    print(f"\n{'mode':6} {'side':9} {'real tokens/s':>22} {'overall':>8} {'step ms':>8} {'MFU':>6} {'peak MiB':>9} {'ours/baseline':>20}")
    for mode, figures in results["modes"].items():
        for side in [key for key in figures if (key == "baseline" or key.startswith("ours")) and not key_is_summary(key)]:
            summary = figures.get(side + "_summary")
            if not summary:
                errors = [r["error"] for r in figures[side] if "error" in r]
                print(f"{mode:6} {side:9} failed: {(errors or ['no runs'])[0][-300:]}")
                continue
            tps = summary["tokens_per_sec"]
            peak = summary.get("peak_mb", {}).get("median")
            ratio = figures.get("ratio_ours_over_baseline" if side == "ours" else f"ratio_{side}_over_ours")
            print(f"{mode:6} {side:9} {tps['median']:>9,.0f} ({tps['min']:,.0f}-{tps['max']:,.0f}) "
                  f"{summary['tokens_per_sec_overall']['median']:8,.0f} {summary['step_ms_median']['median']:8.0f} {summary['mfu_percent']['median']:5.1f}% "
                  f"{peak if peak is None else f'{peak:9,.0f}'} "
                  + (f"{ratio['median']:6.2f}× ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else ""))
        curves = figures.get("loss_curves")
        if curves:
            print(f"{mode:6} loss curves, step by step: mean |ours - baseline| {curves['mean_abs_difference']:.4f}, "
                  f"max {curves['max_abs_difference']:.4f}; first {curves['ours'][0]:.3f} vs {curves['baseline'][0]:.3f}, "
                  f"last {curves['ours'][-1]:.3f} vs {curves['baseline'][-1]:.3f}")


if __name__ == "__main__":
    main()
