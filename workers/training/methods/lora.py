"""LoRA through peft: a low-rank update B·A beside chosen linear layers, with B starting at zero.

Its save, load and merge serve every peft-based method: QLoRA, DoRA, IA³,
prefix and prompt tuning import them from here.
"""

from pathlib import Path

import peft

from workers.training.export import write_label_names
from workers.training.modeling import linear_layer_names
from workers.training.presets import TARGET_MODULE_PRESETS

# For classification, peft also trains and saves the new classifier head ("classifier" or "score").
PEFT_TASK_TYPES = {"causal_lm_sft": peft.TaskType.CAUSAL_LM, "sequence_classification": peft.TaskType.SEQ_CLS}


def apply(model, config, task, family):
    return peft.get_peft_model(model, peft_lora_config(model, config, task, family))


def peft_lora_config(model, config, task, family, **options):
    """peft's LoraConfig for our config section; `options` carry the variants' switches (DoRA's use_dora)."""
    return peft.LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        bias=config.bias,
        target_modules=resolve_target_modules(model, config.target_modules, family),
        **options,
    )


def save(model, directory, base_model_name, label_names=None):
    """Write a peft model's trainable part in the layout `PeftModel.from_pretrained` reads."""
    directory = Path(directory)
    # The config would otherwise name the base model (and prompt tuning's tokenizer) by
    # its path on this worker, which means nothing to whoever downloads the artifact.
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_name
        if getattr(config, "tokenizer_name_or_path", None):
            config.tokenizer_name_or_path = base_model_name
    # The engine never resizes embeddings, and "auto" would ask the hub whether the base model's vocabulary changed.
    model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    # peft adds a README model card; the artifact keeps to safetensors + JSON.
    (directory / "README.md").unlink(missing_ok=True)
    write_label_names(directory, label_names)


def load(base_model, directory):
    return peft.PeftModel.from_pretrained(base_model, directory)


def merge(model, run):
    """Fold the update into the base weights, in place: `model` is spent, the plain transformers model returned."""
    return model.merge_and_unload()


def resolve_target_modules(model, target_modules, family):
    """Turn a preset or a list of names into module-name suffixes, checked against the model's linear layers."""
    if isinstance(target_modules, str):
        if family not in TARGET_MODULE_PRESETS:
            raise ValueError(
                f"target_modules preset {target_modules!r} is not defined for this model's architecture; "
                f"give a list of module names instead, from: {', '.join(_short_names(model))}"
            )
        return TARGET_MODULE_PRESETS[family][target_modules]
    check_module_names(model, target_modules)
    return list(target_modules)


def check_module_names(model, wanted_names, field="target_modules"):
    """Refuse names that match none of the model's linear layers, listing the names that exist."""
    layer_names = linear_layer_names(model)
    unknown = [
        wanted
        for wanted in wanted_names
        if not any(name == wanted or name.endswith("." + wanted) for name in layer_names)
    ]
    if unknown:
        raise ValueError(
            f"{field} {', '.join(repr(name) for name in unknown)} not found among this model's "
            f"linear layers; the names that exist are: {', '.join(_short_names(model))}"
        )


def _short_names(model):
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layer_names(model)})
