"""LoRA through peft: a low-rank update B·A beside chosen linear layers, with B starting at zero."""

import peft

from workers.training.modeling import linear_layer_names

# Preset -> module-name suffixes, per architecture family (see modeling.FAMILY_MARKERS).
TARGET_MODULE_PRESETS = {
    "llama": {
        "attention_qv": ["q_proj", "v_proj"],
        "attention_qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "bert": {
        "attention_qv": ["query", "value"],
        "attention_qkvo": ["query", "key", "value", "attention.output.dense"],
        # "output.dense" is the FFN's down projection (and also matches the attention output).
        "all_linear": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    },
}

# For classification, peft also trains and saves the new classifier head ("classifier" or "score").
PEFT_TASK_TYPES = {"causal_lm_sft": peft.TaskType.CAUSAL_LM, "sequence_classification": peft.TaskType.SEQ_CLS}


def apply(model, config, task, architecture):
    target_modules = resolve_target_modules(model, config.target_modules, architecture)
    lora_config = peft.LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        bias=config.bias,
        target_modules=target_modules,
    )
    return peft.get_peft_model(model, lora_config)


def resolve_target_modules(model, target_modules, architecture):
    """Turn a preset or a list of names into module-name suffixes, checked against the model's linear layers."""
    if isinstance(target_modules, str):
        if architecture not in TARGET_MODULE_PRESETS:
            raise ValueError(
                f"target_modules preset {target_modules!r} is not defined for this model's architecture; "
                f"give a list of module names instead, from: {', '.join(_short_names(model))}"
            )
        return TARGET_MODULE_PRESETS[architecture][target_modules]

    layer_names = linear_layer_names(model)
    unknown = [
        wanted
        for wanted in target_modules
        if not any(name == wanted or name.endswith("." + wanted) for name in layer_names)
    ]
    if unknown:
        raise ValueError(
            f"target_modules {', '.join(repr(name) for name in unknown)} not found among this model's "
            f"linear layers; the names that exist are: {', '.join(_short_names(model))}"
        )
    return list(target_modules)


def _short_names(model):
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layer_names(model)})
