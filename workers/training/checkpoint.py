"""Checkpoints: what a run needs to continue exactly where it stopped, beside the method's artifact so far.

A checkpoint directory (OUTDIR/checkpoints/step-NNNNNN) holds:

    the method's artifact        as method.save writes it, so a checkpoint is also a usable adapter
    trainer_state.json           {"step", "epoch"}, for people and tools that only look
    trainable_parameters.safetensors
                                 every parameter that trains, by its name in the unwrapped model
    training_state.pt            optimizer and scheduler state, RNG states, step, epoch, the counters
                                 behind the final measurements and the recent losses

training_state.pt is written with torch.save and read back with weights_only=True: tensors,
numbers, strings and containers only, never pickled code.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
PARAMETERS_FILE = "trainable_parameters.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
NAMES_SHOWN = 5  # a rank mismatch touches every LoRA matrix; a few names tell the story


@dataclass
class Checkpoint:
    directory: Path
    parameters: dict  # name -> tensor, on the CPU
    training_state: dict  # what save_checkpoint was given


def save_checkpoint(outdir, step, method, model, base_model_name, label_names, training_state):
    """Write a checkpoint of `model` (unwrapped) at `step`; return its path relative to outdir.

    Written beside its final place and renamed into it, so that a process killed
    half-way leaves no directory that looks like a checkpoint but is not one.
    """
    relative = Path(CHECKPOINTS_DIR) / f"step-{step:06d}"
    directory = Path(outdir) / relative
    unfinished = directory.with_name(directory.name + ".unfinished")
    shutil.rmtree(unfinished, ignore_errors=True)  # left by a process killed while writing it
    unfinished.mkdir(parents=True)

    method.save(model, unfinished, base_model_name, label_names)
    parameters = {name: parameter.detach().cpu().contiguous() for name, parameter in trainable_parameters(model)}
    save_file(parameters, unfinished / PARAMETERS_FILE, metadata={"format": "pt"})
    torch.save(training_state, unfinished / TRAINING_STATE_FILE)
    trainer_state = {"step": step, "epoch": training_state["epoch"]}
    (unfinished / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))

    # A run resumed from an earlier checkpoint writes this step again.
    shutil.rmtree(directory, ignore_errors=True)
    unfinished.rename(directory)
    return relative.as_posix()


def load_checkpoint(directory, steps_per_epoch, total_steps):
    """Read a checkpoint to resume a run of `total_steps` steps, `steps_per_epoch` to an epoch, from."""
    directory = Path(directory)
    missing = [name for name in (PARAMETERS_FILE, TRAINING_STATE_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot resume from {directory}: no {' or '.join(missing)} there")
    training_state = torch.load(directory / TRAINING_STATE_FILE, weights_only=True)
    # The data position is a step count: it points at the same rows only with the same batches.
    if training_state["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(
            f"cannot resume from {directory}: it was taken with {training_state['steps_per_epoch']} steps per "
            f"epoch, this run has {steps_per_epoch} (resume only with the same dataset and batch_size)"
        )
    if training_state["step"] > total_steps:
        raise ValueError(
            f"cannot resume from {directory}: it was taken at step {training_state['step']}, "
            f"past the {total_steps} steps this run trains for"
        )
    return Checkpoint(directory, load_file(directory / PARAMETERS_FILE), training_state)


def trainable_parameters(model):
    """(name, parameter) of what trains, whatever the method: LoRA matrices, adapters, heads or every weight."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def load_trainable_parameters(model, checkpoint):
    """Copy a checkpoint's parameters into `model`, refusing unless they are exactly the ones it trains.

    Checked before anything is copied, so a refused checkpoint leaves the model as it was.
    """
    expected, parameters = dict(trainable_parameters(model)), checkpoint.parameters
    missing = sorted(expected.keys() - parameters.keys())
    unexpected = sorted(parameters.keys() - expected.keys())
    wrong_shape = [
        f"{name} {tuple(parameters[name].shape)} (this run: {tuple(parameter.shape)})"
        for name, parameter in expected.items()
        if name in parameters and parameters[name].shape != parameter.shape
    ]
    problems = [
        f"{label}: {_some(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if names
    ]
    if problems:
        raise ValueError(
            f"cannot resume from {checkpoint.directory}: its parameters are not the ones this run trains "
            f"(was it written for another method, base model or config?); " + "; ".join(problems)
        )
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(parameters[name])


def rng_states():
    """The generators that dropout and other random layers draw from."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return states


def restore_rng_states(states):
    torch.set_rng_state(states["cpu"])
    # A checkpoint taken on the CPU has no CUDA state to give; that run used none.
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _some(names):
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown} and {len(names) - NAMES_SHOWN} more"
