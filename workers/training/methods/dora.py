"""DoRA through peft: LoRA with each weight split into a magnitude vector and a direction (use_dora).

The update merges into the weights like LoRA's, so save, load and merge are LoRA's.
"""

import peft

from workers.training.methods.lora import load, merge, peft_lora_config, save  # noqa: F401 (the interface)


def apply(model, config, task, family):
    return peft.get_peft_model(model, peft_lora_config(model, config, task, family, use_dora=True))
