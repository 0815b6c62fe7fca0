"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on a frozen base model.

Our own small module (bottleneck.py): AdapterHub's `adapters` package pins transformers 4.x.
The artifact is the adapters' weights in safetensors plus our own JSON config, and `load`
below puts them back onto a freshly loaded base model.
"""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from jobs.spec import CANNOT_MERGE_REASONS
from workers.training.export import write_label_names
from workers.training.methods.bottleneck import adapter_modules, plan_adapters, transformer_layers
from workers.training.modeling import architecture_family, weight_mismatches

ARTIFACT_TYPE = "bottleneck_adapter"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
README_FILE = "README.md"
# For classification the new, randomly initialised head trains and is saved with the adapters.
CLASSIFIER_HEADS = {"llama": "score", "bert": "classifier"}
AUTO_CLASSES = {
    "causal_lm_sft": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
}

CANNOT_MERGE = CANNOT_MERGE_REASONS["adapter"]  # the same sentence the form and the API show


def apply(model, config, task, family):
    hidden_size = model.config.hidden_size
    bottleneck_size = bottleneck_size_for(config, hidden_size)
    planned = plan_adapters(model, family, config.placement, bottleneck_size, config.activation, config.scaling)
    model.requires_grad_(False)
    for plan in planned.values():
        plan.attach()  # new modules, so their parameters are trainable
    if task == "sequence_classification":
        model.get_submodule(CLASSIFIER_HEADS[family]).requires_grad_(True)
    # save() writes this into the artifact's config; the loop hands save() this same model object.
    model.bottleneck_adapter_layout = {
        "placement": config.placement,
        "bottleneck_size": bottleneck_size,
        "activation": config.activation,
        "scaling": config.scaling,
        "architecture_family": family,
        "hidden_size": hidden_size,
        "num_layers": len(transformer_layers(model, family)),
        "task": task,
    }
    return model


def bottleneck_size_for(config, hidden_size):
    """m: the configured bottleneck size, else hidden size // reduction factor (at least 1)."""
    bottleneck_size = config.bottleneck_size or max(1, hidden_size // config.reduction_factor)
    if bottleneck_size > hidden_size:
        raise ValueError(
            f"bottleneck_size {bottleneck_size} is larger than this model's hidden size {hidden_size}; "
            f"an adapter's bottleneck must be at most the hidden size (hidden size / 16 = "
            f"{max(1, hidden_size // 16)} is a common choice)"
        )
    return bottleneck_size


def save(model, directory, base_model_name, label_names=None):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = model.bottleneck_adapter_layout
    weights = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in _artifact_tensors(model, adapter_modules(model), layout).items()
    }
    save_file(weights, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {"type": ARTIFACT_TYPE, "base_model_name_or_path": base_model_name, **layout}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (directory / README_FILE).write_text(_readme(config, label_names))
    write_label_names(directory, label_names)


def load(base_model, directory):
    """The base model with the saved adapters (and classifier head) put back, in eval mode.

    Everything is checked before the base model is touched, so a failed load leaves it as it was.
    """
    directory = Path(directory)
    layout = _read_layout(directory)
    family = architecture_family(base_model)
    if family != layout["architecture_family"]:
        raise ValueError(
            f"the adapter in {directory} was trained on a {layout['architecture_family']}-style model; "
            f"this base model ({type(base_model).__name__}) is {family or 'of an unsupported architecture'}"
        )
    found = {"hidden_size": base_model.config.hidden_size, "num_layers": len(transformer_layers(base_model, family))}
    differences = [
        f"{key} {layout[key]} (this base model: {value})" for key, value in found.items() if layout[key] != value
    ]
    if differences:
        raise ValueError(f"the adapter in {directory} was trained on another base model: {'; '.join(differences)}")

    planned = plan_adapters(
        base_model, family, layout["placement"], layout["bottleneck_size"], layout["activation"], layout["scaling"]
    )
    expected = _artifact_tensors(base_model, {name: plan.adapter for name, plan in planned.items()}, layout)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}: the adapter's weights are missing")
    weights = load_file(weights_path)
    _check_weights(weights_path, weights, expected)

    for plan in planned.values():
        plan.attach()
    base_model.load_state_dict(weights, strict=False)  # strictness is _check_weights' job: this is a subset
    base_model.requires_grad_(False)
    base_model.bottleneck_adapter_layout = layout
    return base_model.eval()


def _artifact_tensors(model, adapters, layout):
    """{name in the model: tensor} of what the artifact holds: the adapters, and a classifier's head."""
    modules = dict(adapters)
    if layout["task"] == "sequence_classification":
        head = CLASSIFIER_HEADS[layout["architecture_family"]]
        modules[head] = model.get_submodule(head)
    return {f"{name}.{key}": tensor for name, module in modules.items() for key, tensor in module.state_dict().items()}


def _read_layout(directory):
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a saved bottleneck adapter")
    config = json.loads(config_path.read_text())
    if config.get("type") != ARTIFACT_TYPE:
        kind = config.get("type") or config.get("peft_type") or "unknown"
        raise ValueError(f"{config_path} describes a {kind!r} artifact, not a {ARTIFACT_TYPE!r}")
    return {key: value for key, value in config.items() if key not in ("type", "base_model_name_or_path")}


def _check_weights(path, weights, expected):
    problems = [f"{problem}: {', '.join(names)}" for problem, names in weight_mismatches(weights, expected)]
    if problems:
        raise ValueError(f"{path} does not match its {CONFIG_FILE}: " + "; ".join(problems))


def _readme(config, label_names):
    auto_class = AUTO_CLASSES[config["task"]]
    num_labels = f", num_labels={len(label_names)}" if label_names is not None else ""
    return f"""# Bottleneck adapter for {config["base_model_name_or_path"]}

Placement {config["placement"]}, bottleneck size {config["bottleneck_size"]} \
(hidden size {config["hidden_size"]}), activation {config["activation"]}, scaling {config["scaling"]}, \
on {config["num_layers"]} {config["architecture_family"]}-style layers.

Trained with TuneDeck. The adapters are not a peft or AdapterHub format; load them with TuneDeck's loader:

```python
from transformers import {auto_class}
from workers.training.methods import adapter

base = {auto_class}.from_pretrained("{config["base_model_name_or_path"]}"{num_labels})
model = adapter.load(base, "path/to/this/directory")
```

{CANNOT_MERGE}
"""
