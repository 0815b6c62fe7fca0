"""What the web app needs to know about a base model, read without loading its weights."""

import re

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModel
from transformers.pytorch_utils import Conv1D

from workers.training.modeling import architecture_family

_LAYER_INDEX = re.compile(r"\.\d+\.")


def describe_model(path):
    """Family, hidden size and the linear layer names (layer numbers as '*') of the model at `path`."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModel.from_config(config)
    linear_modules = sorted(
        {
            _LAYER_INDEX.sub(".*.", name)
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
        }
    )
    return {
        "family": architecture_family(model),
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "linear_modules": linear_modules,
    }
