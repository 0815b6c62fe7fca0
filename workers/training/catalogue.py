"""What the web app needs to know about a base model, read without loading its weights."""

import re

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModel
from transformers.pytorch_utils import Conv1D

from workers.training.modeling import architecture_family, custom_code_refused_in_plain_words

_LAYER_INDEX = re.compile(r"\.\d+\.")


def describe_model(path, trust_remote_code=False):
    """Family, sizes and the linear layers (layer numbers as '*', with their shapes) of the model at `path`.

    Read from the config on the meta device: no weights are loaded. The sizes feed
    the memory estimate (workers.training.memory_estimate). A model with its own code
    is read only when trusted, like the workers load it.
    """
    with custom_code_refused_in_plain_words(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    linear_shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            weight_shape = list(module.weight.shape)  # Linear: [out, in]; Conv1D: [in, out]
            in_out = weight_shape[::-1] if isinstance(module, torch.nn.Linear) else weight_shape
            pattern = _LAYER_INDEX.sub(".*.", name)
            count = linear_shapes.get(pattern, [0, 0, 0])[2] + 1
            linear_shapes[pattern] = [*in_out, count]
    return {
        "family": architecture_family(model),
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        # The backbone's parameters: the LM or classification head comes on top.
        "parameters": sum(p.numel() for p in model.parameters()),
        "linear_modules": sorted(linear_shapes),
        "linear_shapes": dict(sorted(linear_shapes.items())),
    }
