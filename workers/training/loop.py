"""The training loop: one TrainingRun in, an artifact and progress lines out.

Read top to bottom: set up (seed, data, model, method, optimizer; the state
of a checkpoint when resuming), then the steps (batch in, loss out, a progress
line per step, evals and checkpoints on the way, a pause when asked), then the
artifact, the measurements (and a merged model where the method merges) and a
summary. What makes it fast on a GPU is in speed.py.

Under `accelerate launch` with N processes (one per GPU, DDP), every process
trains on its own batches of batch_size rows and the gradients are averaged;
the first process alone writes progress, checkpoints and the artifact. A run
that would not fit one GPU whole has its weights sharded across them (FSDP,
sharding.py); the first process then keeps a full copy on the CPU to save.
"""

import gc
import math
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.utils import set_seed
from torch.distributed.fsdp import FSDPModule
from transformers import get_linear_schedule_with_warmup

from workers.training import measure, sharding, speed
from workers.training.checkpoint import (
    check_trainable_parameters,
    load_checkpoint,
    load_trainable_parameters,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from workers.training.data import load_training_data, make_loader, real_tokens
from workers.training.evaluate import evaluate
from workers.training.export import ADAPTER_DIR, MERGED_DIR, save_merged
from workers.training.methods import METHODS
from workers.training.modeling import architecture_family, count_parameters, load_model, load_tokenizer

RECENT_STEPS = 10  # the final train_loss is the mean over this many last steps, one batch being noisy


def train(run, outdir, progress, pause_requested=None):
    """Train as `run` says, writing into `outdir`; return the trained model, or None when paused.

    Where the method merges in place (LoRA, DoRA, IA³), the returned model has
    been merged for the latency measurement: it computes the same function,
    up to float rounding, but no longer holds the method's layers.

    `pause_requested` (a threading.Event, set from a signal handler) or a file
    named PAUSE in `outdir` stops the run after the step in progress, with a
    checkpoint at that step and no artifact.
    """
    wall_start = time.perf_counter()
    outdir = Path(outdir)
    spec, hyperparameters = run.spec, run.spec.hyperparameters
    method = METHODS[spec.method.type]
    can_merge = hasattr(method, "merge")
    # JobSpec refuses this at submission already; this guards a method missing from its table,
    # which would otherwise fail only after training.
    if spec.export_merged and not can_merge:
        raise ValueError(f"export_merged: {method.CANNOT_MERGE}")
    set_seed(hyperparameters.seed)
    on_gpu = torch.cuda.is_available()
    # bf16 keeps fp32's range, so it needs no loss scaling; GPUs without it train in full precision.
    accelerator = Accelerator(
        cpu=not on_gpu,
        mixed_precision="bf16" if speed.on_bf16_gpu() else "no",
        # The next batch is copied to the GPU while a step runs (from pinned memory: data.make_loader).
        dataloader_config=DataLoaderConfiguration(non_blocking=on_gpu),
    )
    sharded = run.shard_weights and accelerator.num_processes > 1

    # --- data ---
    tokenizer = load_tokenizer(run.model_path, run.trust_remote_code)
    data = load_training_data(run, tokenizer, log=progress.log)

    # --- model and method ---
    base_model_kwargs = {"dtype": speed.base_dtype(spec.method.type)}
    if hasattr(method, "base_model_kwargs"):
        base_model_kwargs.update(method.base_model_kwargs(spec.method, spec.task, on_gpu))
    model = load_model(run, data.label_names, data.pad_token_id, **base_model_kwargs)
    # Padding-free: a batch's sequences packed into one row (data.py), where the method allows it and
    # transformers reads packed rows from the position ids (the families our presets know); others stay padded.
    packs = (
        spec.task == "causal_lm_sft"
        and getattr(method, "PACKS_SEQUENCES", True)
        and architecture_family(model) == "llama"
    )
    attention = speed.attend_within_sequences(model) if packs else None
    train_loader = make_loader(
        data.train,
        hyperparameters.batch_size,
        data.pad_token_id,
        shuffle=True,
        seed=hyperparameters.seed,
        pack=packs,
        processes=accelerator.num_processes,
        max_seq_length=hyperparameters.max_seq_length,
    )
    eval_loader = make_loader(data.eval, hyperparameters.batch_size, data.pad_token_id)
    fused_loss = spec.task == "causal_lm_sft" and speed.use_liger(model, spec.method.type)
    flops_per_token = speed.flops_per_token(spec.method.type, speed.matmul_parameters(model))
    peak_flops = speed.peak_flops()
    reference_loader, reference_loss_before = None, None
    if data.reference:
        # The forgetting check: the base model's loss on text of its own domain, before the method touches it.
        reference_loader = accelerator.prepare_data_loader(
            make_loader(data.reference, hyperparameters.batch_size, data.pad_token_id)
        )
        if not sharded:  # else once sharded: whole, the base would not fit one GPU
            reference_loss_before = reference_loss(model, reference_loader, accelerator)
    if hyperparameters.gradient_checkpointing:
        # Non-reentrant: the variant torch recommends, which also works when the inputs need no gradient.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, spec.method, spec.task, architecture_family(model))
    speed.trainable_in_float32(model)
    lora_dropout_kernel = speed.use_lora_dropout_kernel(model)
    trainable_params, total_params = count_parameters(model)
    # Before the optimizer is made, which must hold the shards.
    full_copy = sharding.shard(model, accelerator.is_main_process, speed.on_bf16_gpu()) if sharded else None
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained,
        lr=hyperparameters.learning_rate,
        weight_decay=hyperparameters.weight_decay,
        fused=on_gpu,  # one kernel for all parameters instead of several per tensor
    )
    # Planned here, before prepare(), since blocks compile before they are wrapped; total_steps, below,
    # counts the prepared loader's batches exactly. A resumed job decides on all its steps, not those left.
    planned_steps = hyperparameters.max_steps or hyperparameters.epochs * math.ceil(
        len(data.train) / (hyperparameters.batch_size * accelerator.num_processes)
    )
    tokens_per_step = hyperparameters.batch_size * sum(len(row.input_ids) for row in data.train) / len(data.train)
    compiled = speed.compile_in_place(model, flops_per_token * tokens_per_step, planned_steps)
    # Sharded, the gradients are reduce-scattered as they come, outside anything a graph could hold.
    graphed = not sharded and speed.use_cuda_graphs(model, packs, fused_loss)
    # Graphed, several processes train without DDP's wrapper: its gradient hooks keep autograd nodes
    # that break a graph's capture. GraphedSteps averages the gradients over the processes itself.
    # Sharded, FSDP averages them.
    model = accelerator.prepare_model(model, evaluation_mode=graphed or sharded)
    optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)

    # Counted on the prepared loader, which holds this process's share of the rows.
    steps_per_epoch = len(train_loader)
    total_steps = hyperparameters.max_steps or hyperparameters.epochs * steps_per_epoch
    # Not passed to prepare(): accelerate would step it once per process, and
    # total_steps already counts this process's steps.
    scheduler = get_linear_schedule_with_warmup(optimizer, hyperparameters.warmup_steps, total_steps)

    # --- where training starts: step 0, or where a checkpoint left it ---
    step, tokens_seen, training_seconds, earlier_wall_seconds = 0, 0, 0.0, 0.0
    recent_losses = deque(maxlen=RECENT_STEPS)
    if run.resume_from:
        checkpoint = load_checkpoint(run.resume_from, steps_per_epoch, total_steps)
        state = checkpoint.training_state
        if sharded:
            check_trainable_parameters(model, checkpoint)
            sharding.load(model, optimizer, checkpoint.parameters, state["optimizer"])
        else:
            load_trainable_parameters(accelerator.unwrap_model(model), checkpoint)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, training_seconds = state["step"], state["tokens_seen"], state["training_seconds"]
        earlier_wall_seconds = state["wall_seconds"]
        recent_losses.extend(state["recent_losses"])
        # Last: loading the model and applying the method drew from these generators too.
        restore_rng_states(state["rng"])

    # Graphed, the routed LoRA linears take bf16 copies of their weights and their dropout seeds from each step's start.
    step_inputs = speed.step_inputs(model, lora_dropout_kernel) if graphed else None
    computed_from = step_inputs.computed_from(trained) if step_inputs else trained

    def forward_backward(batch):
        if step_inputs:
            step_inputs.refresh()
        loss = model(**batch).loss
        if graphed:
            speed.write_gradients(loss, trained, computed_from)
        else:
            accelerator.backward(loss)
        return loss.detach()

    take_step = speed.GraphedSteps(forward_backward, trained, progress.log) if graphed else forward_backward

    if sharded and data.reference:
        # Measured on the base's function: every method starts as it, but prefix and prompt tuning, which peft turns off.
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            reference_loss_before = reference_loss(model, reference_loader, accelerator)

    progress.emit(
        "started",
        resumed_from_step=step,
        total_steps=total_steps,
        trainable_params=trainable_params,
        total_params=total_params,
        device=accelerator.device.type,
        gpus=accelerator.num_processes if on_gpu else 0,
        train_rows=len(data.train),
        eval_rows=len(data.eval),
    )
    progress.log(
        f"{'packed' if packs else 'padded'} batches, {next(model.parameters()).dtype} base weights"
        f"{f', sharded over {accelerator.num_processes} processes (FSDP)' if sharded else ''}"
        f"{f', {attention}' if attention else ''}{f', {compiled}' if compiled else ''}{', CUDA graphs' if graphed else ''}"
        f"{', fused linear cross-entropy' if fused_loss else ''}"
        f"{f', LoRA dropout kernel in {lora_dropout_kernel} linears' if lora_dropout_kernel else ''}"
    )
    if data.reference:
        progress.log(f"forgetting check: the base model's loss on the reference set is {reference_loss_before:.4f}")

    def whole_model_and_optimizer_state():
        """The unwrapped model, whole, and the optimizer's state, on the first process; every process must call it."""
        if sharded:
            sharding.gather_weights(model, full_copy)
            return full_copy, sharding.gather_optimizer_state(model, optimizer)
        return accelerator.unwrap_model(model), optimizer.state_dict()

    def save_a_checkpoint(step):
        accelerator.wait_for_everyone()
        whole_model, optimizer_state = whole_model_and_optimizer_state()
        if not accelerator.is_main_process:
            return None
        training_state = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "tokens_seen": tokens_seen,
            "training_seconds": training_seconds,
            "wall_seconds": earlier_wall_seconds + time.perf_counter() - wall_start,
            "recent_losses": list(recent_losses),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_states(),
        }
        path = save_checkpoint(outdir, step, method, whole_model, spec.base_model, data.label_names, training_state)
        progress.emit("checkpoint", step=step, path=path)
        return path

    def run_eval(step):
        evaluation = evaluate(model, eval_loader, spec.task, accelerator)
        progress.emit("eval", step=step, eval_loss=evaluation.loss, eval_accuracy=evaluation.accuracy)
        return evaluation

    # --- the steps ---
    def report(launched):
        """Read a launched step's exchange (waiting for the GPU to finish that step) and write its progress line."""
        nonlocal tokens_seen, training_seconds, step_start
        reported_step, learning_rate, exchanged = launched
        train_loss, tokens = exchanged.tolist()  # waits for that step alone: true timings
        train_loss, tokens = train_loss / accelerator.num_processes, int(tokens)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"the training loss became {train_loss} at step {reported_step}; try a lower learning_rate"
            )
        recent_losses.append(train_loss)
        tokens_seen += tokens
        now = time.perf_counter()
        training_seconds += now - step_start
        tokens_per_sec = tokens / (now - step_start)
        step_start = now
        progress.emit(
            "step",
            step=reported_step,
            epoch=reported_step / steps_per_epoch,
            train_loss=train_loss,
            learning_rate=learning_rate,
            tokens_per_sec=tokens_per_sec,
            tokens_seen=tokens_seen,
            mfu=speed.mfu(tokens_per_sec, flops_per_token, peak_flops, accelerator.num_processes),
            gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
            cpu_memory_mb=measure.peak_cpu_memory_mb(),
        )

    # Agreed on the CPUs (over gloo, beside the GPUs' NCCL), so that every process pauses after the same step
    # without waiting for its GPU.
    pause_group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None

    def pause_asked_by_any_process():
        asked = (pause_requested is not None and pause_requested.is_set()) or (outdir / "PAUSE").exists()
        if pause_group is None:
            return asked
        votes = torch.tensor([float(asked)])
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, group=pause_group)
        return votes.item() > 0

    # Everything made so far (torch, the model, the data) lives until the end: frozen out of the
    # garbage collector's sight, its full collections no longer pause a step for tens of milliseconds.
    gc.freeze()
    model.train()
    step_start = time.perf_counter()
    while step < total_steps:
        epoch, batches_done = divmod(step, steps_per_epoch)
        train_loader.set_epoch(epoch)  # the epoch's order, the same as any run with this seed gave it
        # Only a resumed run starts inside an epoch: it skips the batches trained on before the checkpoint.
        batches = iter(skip_first_batches(train_loader, batches_done) if batches_done else train_loader)
        batch = next(batches, None)
        unread = None  # the step launched before this one, while its loss is not read yet
        while batch is not None:
            learning_rate = scheduler.get_last_lr()[0]
            tokens = real_tokens(batch)
            loss = take_step(batch)
            optimizer.step()
            scheduler.step()
            if not graphed:  # graphed steps overwrite their gradients
                optimizer.zero_grad()
            step += 1
            # One exchange between the GPUs per step: the mean loss and all real tokens.
            exchanged = torch.stack([loss.detach().float(), tokens.to(loss.device).float()])
            launched = (step, learning_rate, speed.HostCopy(accelerator.reduce(exchanged, "sum")))
            pausing = pause_asked_by_any_process()

            # The GPU is never left waiting on Python (bench/README.md): while it computes this step, the next
            # batch is collated and its copy queued, and the step before's loss is read and reported.
            batch = next(batches, None)
            if unread:
                report(unread)
            unread = launched
            # The last step is evaluated after the loop anyway.
            eval_due = data.eval and hyperparameters.eval_every and step % hyperparameters.eval_every == 0
            checkpoint_due = step % hyperparameters.checkpoint_every == 0
            if not (eval_due or checkpoint_due or pausing or step == total_steps or batch is None):
                continue  # read after the next step is launched
            # What follows needs this step's weights: nothing more is launched until this step is read.
            report(unread)
            unread = None
            if eval_due and step < total_steps:
                run_eval(step)
            # A pause asked for during the last step comes too late to save anything: the run finishes.
            pausing = pausing and step < total_steps
            if checkpoint_due or pausing:
                checkpoint_path = save_a_checkpoint(step)
            if pausing:
                progress.emit("paused", step=step, path=checkpoint_path)
                return None
            if step == total_steps:
                break
            # Started after the bookkeeping so that evals and checkpoints do not count as training time.
            step_start = time.perf_counter()

    # --- the result ---
    evaluation = run_eval(step) if data.eval else None
    reference_loss_after = reference_loss(model, reference_loader, accelerator) if reference_loader else None
    accelerator.wait_for_everyone()
    if sharded:
        sharding.gather_weights(model, full_copy)
    if not accelerator.is_main_process:
        return None
    # Taken now: merging below may load another copy of the base (QLoRA reloads it unquantized).
    peak_memory_mb = measure.peak_memory_mb()
    # Without the mixed-precision wrapper, the model returned computes in full
    # precision, as the saved artifact will when loaded. Sharded, it is the full copy, on the CPU.
    trained_model = full_copy if sharded else accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    method.save(trained_model, outdir / ADAPTER_DIR, spec.base_model, data.label_names)
    if spec.method.type == "full":
        # The whole model is the artifact; with its tokenizer it stands alone.
        tokenizer.save_pretrained(outdir / ADAPTER_DIR)
    progress.emit("artifact", kind="adapter", path=ADAPTER_DIR)

    # --- inference latency, unmerged and merged ---
    # Timed on one eval batch (a train batch when nothing is held out), in the precision the job trained in.
    # Not for a sharded run: its model is whole only in the CPU copy, which says nothing of a GPU's latency.
    latency_batch = None
    if not sharded:
        latency_batch = next(iter(eval_loader if data.eval else train_loader))
        real_tokens(latency_batch)  # a packed batch's count is not for the model

    def latency_ms_of(timed_model):
        if latency_batch is None:
            return None
        with accelerator.autocast():
            return measure.latency_ms(timed_model, latency_batch)

    latency_ms, latency_merged_ms = latency_ms_of(trained_model), None
    if can_merge:
        merged_model = method.merge(trained_model, run)
        latency_merged_ms = latency_ms_of(merged_model)
        if spec.export_merged:
            save_merged(merged_model, tokenizer, outdir / MERGED_DIR)
            progress.emit("artifact", kind="merged", path=MERGED_DIR)

    sft = spec.task == "causal_lm_sft"
    progress.emit(
        "finished",
        steps=step,
        train_loss=sum(recent_losses) / len(recent_losses),
        eval_loss=evaluation.loss if evaluation else None,
        eval_accuracy=evaluation.accuracy if evaluation else None,
        eval_f1=evaluation.macro_f1 if evaluation else None,
        perplexity=measure.perplexity(evaluation.loss) if evaluation and sft else None,
        wall_time_s=earlier_wall_seconds + time.perf_counter() - wall_start,
        trainable_params=trainable_params,
        total_params=total_params,
        tokens_per_sec=tokens_seen / training_seconds,
        mfu=speed.mfu(tokens_seen / training_seconds, flops_per_token, peak_flops, accelerator.num_processes),
        peak_memory_mb=peak_memory_mb,
        artifact_bytes=measure.size_on_disk(outdir / ADAPTER_DIR),
        latency_ms=latency_ms,
        latency_merged_ms=latency_merged_ms,
        reference_loss_before=reference_loss_before,
        reference_loss_after=reference_loss_after,
    )
    return trained_model


def reference_loss(model, loader, accelerator):
    # A quantized base was loaded onto its device already and cannot be moved, nor can a sharded one, put on
    # its device by sharding; prepare() moves the others later.
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if not (quantized or isinstance(model, FSDPModule)):
        model.to(accelerator.device)
    with accelerator.autocast():
        return evaluate(model, loader, "causal_lm_sft", accelerator).loss
