"""IA³ through peft: learned vectors that rescale the keys, the values and the feed-forward activations.

Target modules default to peft's own choice for the model type (its
TRANSFORMERS_MODELS_TO_IA3_* mappings), else to the choice for the model's
architecture family. A feed-forward module is scaled on its input (the FFN's
activations), the others on their output. The scaling folds into the weights,
so it merges like LoRA.
"""

import peft
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD_MODULES,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGET_MODULES,
)

from workers.training.methods.lora import PEFT_TASK_TYPES, check_module_names, load, merge, save  # noqa: F401


def apply(model, config, task, family):
    target_modules, feedforward_modules = resolve_modules(model, config, family)
    ia3_config = peft.IA3Config(
        task_type=PEFT_TASK_TYPES[task], target_modules=target_modules, feedforward_modules=feedforward_modules
    )
    return peft.get_peft_model(model, ia3_config)


def resolve_modules(model, config, family):
    """(target_modules, feedforward_modules) for this model, checked against its linear layers."""
    default_targets, default_feedforward = _defaults(model.config.model_type, family)
    if config.target_modules == "default":
        if default_targets is None:
            raise ValueError(
                "IA³ has no default modules for this architecture; give target_modules and feedforward_modules"
            )
        target_modules, feedforward_modules = default_targets, default_feedforward
    else:
        target_modules = config.target_modules
        # Unsaid, the feed-forward ones among the chosen modules are those the architecture's default calls so.
        feedforward_modules = config.feedforward_modules
        if feedforward_modules is None:
            feedforward_modules = [name for name in target_modules if name in (default_feedforward or [])]
    check_module_names(model, target_modules)
    return list(target_modules), list(feedforward_modules)


def _defaults(model_type, family):
    for key in (model_type, family):
        if key in PEFT_TARGET_MODULES:
            return PEFT_TARGET_MODULES[key], PEFT_FEEDFORWARD_MODULES.get(key, [])
    return None, None
