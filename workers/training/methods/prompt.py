"""Prompt tuning through peft: trainable virtual token embeddings put before the input.

With init_text, the virtual tokens start as the embeddings of that text's tokens
(repeated or cut to num_virtual_tokens), which trains faster than random ones.
"""

import peft

from jobs.spec import CANNOT_MERGE_REASONS
from workers.training.methods.lora import PEFT_TASK_TYPES, load, save  # noqa: F401 (the interface)

CANNOT_MERGE = CANNOT_MERGE_REASONS["prompt"]  # the same sentence the form and the API show
PACKS_SEQUENCES = False  # its virtual tokens go before each row's input, so a row must hold one sequence


def apply(model, config, task, family):
    from_text = {}
    if config.init_text:
        from_text = {
            "prompt_tuning_init": peft.PromptTuningInit.TEXT,
            "prompt_tuning_init_text": config.init_text,
            # The tokenizer lies beside the weights: the path the base model was loaded from.
            "tokenizer_name_or_path": model.name_or_path,
        }
    prompt_config = peft.PromptTuningConfig(
        task_type=PEFT_TASK_TYPES[task], num_virtual_tokens=config.num_virtual_tokens, **from_text
    )
    return peft.get_peft_model(model, prompt_config)
