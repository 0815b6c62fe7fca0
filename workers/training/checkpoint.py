"""Checkpoints: what a run needs to continue exactly where it stopped, beside the method's artifact so far.

A checkpoint directory (OUTDIR/checkpoints/step-NNNNNN) holds:

    the method's artifact        as method.save writes it, so a checkpoint is also a usable adapter
    trainer_state.json           {"step", "epoch"}, for people and tools that only look
    trainable_parameters.safetensors
                                 every parameter that trains, by its name in the unwrapped model
    training_state.safetensors   the tensors of the training state: the optimizer's per-parameter
                                 state (optimizer.state.<param index>.<name>, e.g. exp_avg) and the
                                 random generators' states (rng.cpu, rng.cuda) as uint8 tensors
    training_state.json          the rest of it: optimizer param_groups, scheduler state, step, epoch,
                                 the counters behind the final measurements, the recent losses, and
                                 which tensor of training_state.safetensors goes where

Checkpoints are offered for download, so, like every artifact, they hold safetensors and JSON
only: no pickle, not even one read back with weights_only=True. load_checkpoint rebuilds the
very dict save_checkpoint was given (integer parameter indices, tensors in their dtypes, betas
as tuples), for optimizer.load_state_dict and scheduler.load_state_dict to take as they are.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.training.modeling import weight_mismatches

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
PARAMETERS_FILE = "trainable_parameters.safetensors"
TRAINING_STATE_FILE = "training_state.json"
TRAINING_TENSORS_FILE = "training_state.safetensors"
TRAINING_STATE_FORMAT = 1  # of training_state.json; a later layout gets another number
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
    write_training_state(unfinished, training_state)
    trainer_state = {"step": step, "epoch": training_state["epoch"]}
    (unfinished / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))

    # A run resumed from an earlier checkpoint writes this step again.
    shutil.rmtree(directory, ignore_errors=True)
    unfinished.rename(directory)
    return relative.as_posix()


def load_checkpoint(directory, steps_per_epoch, total_steps):
    """Read a checkpoint to resume a run of `total_steps` steps, `steps_per_epoch` to an epoch, from."""
    directory = Path(directory)
    needed = (PARAMETERS_FILE, TRAINING_STATE_FILE, TRAINING_TENSORS_FILE)
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot resume from {directory}: no {' or '.join(missing)} there")
    training_state = read_training_state(directory)
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


def write_training_state(directory, training_state):
    """Write `training_state` (as the loop builds it) as training_state.safetensors and training_state.json.

    The optimizer's and the generators' tensors go to the safetensors file; the JSON holds
    everything else and, where a tensor was, {"tensor": its key in the safetensors file}.
    Anything JSON would not give back as it was (a tuple, an integer key, an object) is
    refused here rather than found changed when resuming; the tuples of the optimizer's
    param_groups (betas) are listed, to be made tuples again.
    """
    tensors = {}

    def tensor_or_value(value, key):
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"tensor": key}
        return {"value": _as_json(value, key)}

    optimizer = training_state["optimizer"]
    param_groups, param_group_tuples = [], []
    for index, group in enumerate(optimizer["param_groups"]):
        tuples = [key for key, value in group.items() if isinstance(value, tuple)]
        plain = {key: list(value) if key in tuples else value for key, value in group.items()}
        param_groups.append(_as_json(plain, f"optimizer.param_groups.{index}"))
        param_group_tuples.append(tuples)
    # Only the parameters that have been stepped have state; json would make their integer indices strings.
    state = [
        {
            "param": _as_json(index, "optimizer.state index"),
            "state": {
                name: tensor_or_value(value, f"optimizer.state.{index}.{name}") for name, value in values.items()
            },
        }
        for index, values in optimizer["state"].items()
    ]
    document = {"format": TRAINING_STATE_FORMAT}
    for key, value in training_state.items():
        if key == "optimizer":
            value = {"param_groups": param_groups, "param_group_tuples": param_group_tuples, "state": state}
        elif key == "rng":
            tensors.update({f"rng.{name}": generator.contiguous() for name, generator in value.items()})
            value = {name: f"rng.{name}" for name in value}
        else:
            # The scheduler's state included: LambdaLR keeps plain numbers and, for its lr_lambdas,
            # None (a function) or the __dict__ of a callable object ({} for transformers' partials).
            value = _as_json(value, key)
        document[key] = value

    save_file(tensors, directory / TRAINING_TENSORS_FILE, metadata={"format": "pt"})
    (directory / TRAINING_STATE_FILE).write_text(json.dumps(document, indent=1))


def read_training_state(directory):
    """The dict write_training_state was given, rebuilt from a checkpoint directory."""
    directory = Path(directory)
    document = json.loads((directory / TRAINING_STATE_FILE).read_text())
    if document.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(
            f"cannot resume from {directory}: its {TRAINING_STATE_FILE} is of format {document.get('format')!r}, "
            f"this engine reads format {TRAINING_STATE_FORMAT}"
        )
    tensors = load_file(directory / TRAINING_TENSORS_FILE)

    def tensor_or_value(stored):
        return tensors[stored["tensor"]] if "tensor" in stored else stored["value"]

    training_state = {key: value for key, value in document.items() if key != "format"}
    optimizer = training_state["optimizer"]
    training_state["optimizer"] = {
        "state": {
            entry["param"]: {name: tensor_or_value(stored) for name, stored in entry["state"].items()}
            for entry in optimizer["state"]
        },
        "param_groups": [
            {key: tuple(value) if key in tuples else value for key, value in group.items()}
            for group, tuples in zip(optimizer["param_groups"], optimizer["param_group_tuples"], strict=True)
        ],
    }
    training_state["rng"] = {name: tensors[key] for name, key in training_state["rng"].items()}
    return training_state


def _as_json(value, where):
    """`value`, checked to come back from JSON equal and of the same types; TypeError naming `where` if not."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_as_json(item, f"{where}.{index}") for index, item in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _as_json(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(f"cannot write {where} into {TRAINING_STATE_FILE}: a {type(value).__name__} does not survive JSON")


def trainable_parameters(model):
    """(name, parameter) of what trains, whatever the method: LoRA matrices, adapters, heads or every weight."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def load_trainable_parameters(model, checkpoint):
    """Copy a checkpoint's parameters into `model`, refusing unless they are exactly the ones it trains.

    Checked before anything is copied, so a refused checkpoint leaves the model as it was.
    """
    check_trainable_parameters(model, checkpoint)
    with torch.no_grad():
        for name, parameter in trainable_parameters(model):
            parameter.copy_(checkpoint.parameters[name])


def check_trainable_parameters(model, checkpoint):
    """ValueError unless the checkpoint's parameters are exactly the ones `model` trains, by name and shape."""
    expected, parameters = dict(trainable_parameters(model)), checkpoint.parameters
    problems = [
        f"{problem}: {_some(names)}"
        for problem, names in weight_mismatches(parameters, expected, expected_as="this run:")
    ]
    if problems:
        raise ValueError(
            f"cannot resume from {checkpoint.directory}: its parameters are not the ones this run trains "
            f"(was it written for another method, base model or config?); " + "; ".join(problems)
        )


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
