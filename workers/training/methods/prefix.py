"""Prefix tuning through peft: trainable key/value vectors put before the sequence in every attention layer."""

import peft

from jobs.spec import CANNOT_MERGE_REASONS
from workers.training.methods.lora import PEFT_TASK_TYPES, load, save  # noqa: F401 (the interface)

CANNOT_MERGE = CANNOT_MERGE_REASONS["prefix"]  # the same sentence the form and the API show
PACKS_SEQUENCES = False  # its key/value vectors sit before each sequence's attention, one sequence per row


def apply(model, config, task, family):
    prefix_config = peft.PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task], num_virtual_tokens=config.num_virtual_tokens
    )
    return peft.get_peft_model(model, prefix_config)
