"""The training loop: one TrainingRun in, an adapter and progress lines out.

Read top to bottom: set up (seed, data, model, method, optimizer), then the
steps (batch in, loss out, a progress line per step, evals and checkpoints on
the way), then the artifact and a summary.
"""

import math
import resource
import sys
import time
from collections import deque
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_linear_schedule_with_warmup

from workers.training.data import load_training_data, make_loader
from workers.training.evaluate import evaluate
from workers.training.export import ADAPTER_DIR, save_adapter, save_checkpoint
from workers.training.methods import METHODS
from workers.training.modeling import architecture_family, count_parameters, load_model, load_tokenizer

RECENT_STEPS = 10  # the final train_loss is the mean over this many last steps, one batch being noisy


def train(run, outdir, progress):
    """Train as `run` says, writing into `outdir`; return the trained model."""
    wall_start = time.perf_counter()
    outdir = Path(outdir)
    spec, hyperparameters = run.spec, run.spec.hyperparameters
    set_seed(hyperparameters.seed)
    on_gpu = torch.cuda.is_available()
    # bf16 keeps fp32's range, so it needs no loss scaling; GPUs without it train in full precision.
    accelerator = Accelerator(
        cpu=not on_gpu, mixed_precision="bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    )

    # --- data ---
    tokenizer = load_tokenizer(run.model_path)
    data = load_training_data(run, tokenizer, log=progress.log)
    train_loader = make_loader(
        data.train, hyperparameters.batch_size, data.pad_token_id, shuffle=True, seed=hyperparameters.seed
    )
    eval_loader = make_loader(data.eval, hyperparameters.batch_size, data.pad_token_id)

    # --- model and method ---
    model = load_model(run, data.label_names, data.pad_token_id)
    model = METHODS[spec.method.type].apply(model, spec.method, spec.task, architecture_family(model))
    trainable_params, total_params = count_parameters(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=hyperparameters.learning_rate,
        weight_decay=hyperparameters.weight_decay,
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    # Counted on the prepared loader, which holds this process's share of the rows.
    steps_per_epoch = len(train_loader)
    total_steps = hyperparameters.max_steps or hyperparameters.epochs * steps_per_epoch
    # Not passed to prepare(): accelerate would step it once per process, and
    # total_steps already counts this process's steps.
    scheduler = get_linear_schedule_with_warmup(optimizer, hyperparameters.warmup_steps, total_steps)

    progress.emit(
        "started",
        total_steps=total_steps,
        trainable_params=trainable_params,
        total_params=total_params,
        device=accelerator.device.type,
        train_rows=len(data.train),
        eval_rows=len(data.eval),
    )

    def save_a_checkpoint(step):
        path = save_checkpoint(
            accelerator.unwrap_model(model), outdir, step, step / steps_per_epoch, spec.base_model, data.label_names
        )
        progress.emit("checkpoint", step=step, path=path)

    def run_eval(step):
        eval_loss, eval_accuracy = evaluate(model, eval_loader, spec.task)
        progress.emit("eval", step=step, eval_loss=eval_loss, eval_accuracy=eval_accuracy)
        return eval_loss, eval_accuracy

    # --- the steps ---
    model.train()
    step, tokens_seen = 0, 0
    recent_losses = deque(maxlen=RECENT_STEPS)
    step_start = time.perf_counter()
    while step < total_steps:
        for batch in train_loader:
            learning_rate = scheduler.get_last_lr()[0]
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            train_loss = loss.item()  # waits for the GPU, so the timing below is true
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"the training loss became {train_loss} at step {step}; try a lower learning_rate"
                )
            recent_losses.append(train_loss)
            tokens = int(batch["attention_mask"].sum())  # real tokens, not padding
            tokens_seen += tokens
            now = time.perf_counter()
            progress.emit(
                "step",
                step=step,
                epoch=step / steps_per_epoch,
                train_loss=train_loss,
                learning_rate=learning_rate,
                tokens_per_sec=tokens / (now - step_start),
                tokens_seen=tokens_seen,
                gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
                cpu_memory_mb=_peak_cpu_memory_mb(),
            )

            # The last step is evaluated after the loop anyway.
            eval_due = hyperparameters.eval_every and step % hyperparameters.eval_every == 0
            if data.eval and eval_due and step < total_steps:
                run_eval(step)
            if step % hyperparameters.checkpoint_every == 0:
                save_a_checkpoint(step)
            if step == total_steps:
                break
            # Started after the bookkeeping so that evals and checkpoints do not count as training time.
            step_start = time.perf_counter()

    # --- the result ---
    eval_loss, eval_accuracy = run_eval(step) if data.eval else (None, None)
    # Without the mixed-precision wrapper, the model returned computes in full
    # precision, as the saved adapter will when loaded.
    trained_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    save_adapter(trained_model, outdir / ADAPTER_DIR, spec.base_model, data.label_names)
    progress.emit("artifact", kind="adapter", path=ADAPTER_DIR)
    progress.emit(
        "finished",
        steps=step,
        train_loss=sum(recent_losses) / len(recent_losses),
        eval_loss=eval_loss,
        eval_accuracy=eval_accuracy,
        wall_time_s=time.perf_counter() - wall_start,
        trainable_params=trainable_params,
        total_params=total_params,
    )
    return trained_model


def _peak_cpu_memory_mb():
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
