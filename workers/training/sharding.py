"""Sharded training (FSDP) for a job whose training state does not fit one of its GPUs whole.

The worker sets TrainingRun.shard_weights when a job asks for several GPUs and its memory
estimate fits one GPU only split across them (jobs/placement.py). Each transformer block
is then a unit of torch's fully_shard (FSDP2), as is the rest of the model: every process
holds 1/N of the weights, of their gradients and of AdamW's state. A block's weights are
gathered whole (in bf16 on a GPU) just before its forward and again for its backward, and
freed after; gradients are reduce-scattered, each process keeping the mean of its share.

torch's own API, not accelerate's FSDP plugin: accelerate turns the plugin into plain
DDP on a CPU, where torch's fully_shard runs as it does on GPUs (over gloo), so the CI
tests this same path.

Checkpoints, the artifact and merging need the weights whole: the first process keeps a
full copy of the model on the CPU, made before sharding, into which `gather_weights` copies the
trained weights (every process takes part, each sending its shards). The optimizer state is
gathered in the layout optimizer.state_dict() gives (parameter indices), so a checkpoint of a
sharded run is the same as an unsharded one's, and either kind of run resumes from it.
"""

import copy

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from workers.training.speed import transformer_blocks

# Only the first process's copy receives anything; the others get empty dicts.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
GATHERED_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def shard(model, keep_full_copy, in_bf16):
    """Shard `model` in place across the processes, block by block; return the full CPU copy, or None.

    `keep_full_copy` on the first process only. `in_bf16`: weights are gathered in bf16
    (the frozen base already is; trained float32 weights are cast for the gather, their
    gradients reduced in float32), so the blocks' float32 weights are never whole on a GPU.
    """
    full_copy = copy.deepcopy(model) if keep_full_copy else None
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if in_bf16 else None
    options = {"mp_policy": precision} if precision else {}
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError("cannot shard this model over several GPUs: it has no repeated transformer blocks to split")
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return full_copy


def gather_weights(model, full_copy):
    """Copy the sharded model's trained weights into `full_copy` (the first process's; None elsewhere).

    A collective, as is gather_optimizer_state: every process must call it at the same point.
    """
    trained = get_model_state_dict(model, options=GATHERED_TRAINABLE)
    if full_copy is None:
        return
    # Only the trained weights come back: the frozen ones in the copy are those it was made with.
    mismatch = full_copy.load_state_dict(trained, strict=False)
    if mismatch.unexpected_keys:
        raise RuntimeError(f"gathered weights the full copy lacks: {mismatch.unexpected_keys[:5]}")


def gather_optimizer_state(model, optimizer):
    """The optimizer's state whole, in optimizer.state_dict()'s layout, on the first process ({} elsewhere)."""
    state = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    return by_index(state) if state else {}


def load(model, optimizer, parameters, optimizer_state):
    """Load a checkpoint's trained weights and optimizer state (whole, in optimizer.state_dict()'s layout)
    into the sharded model; every process takes its shards."""
    set_model_state_dict(model, parameters, options=StateDictOptions(full_state_dict=True, strict=False))
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    set_optimizer_state_dict(model, optimizer, by_name(optimizer_state, names), options=StateDictOptions(full_state_dict=True))


def by_index(state):
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's) keyed by index instead, as
    optimizer.state_dict() keys it: the parameters numbered in the order of the param groups."""
    index = {name: number for number, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [group | {"params": [index[name] for name in group["params"]]} for group in state["param_groups"]],
    }


def by_name(state, names):
    """The inverse of by_index: `names` are the trained parameters' names, in the optimizer's order."""
    return {
        "state": {names[number]: values for number, values in state["state"].items()},
        "param_groups": [group | {"params": [names[number] for number in group["params"]]} for group in state["param_groups"]],
    }
