"""Loading the base model and telling which architecture family it belongs to."""

from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

# Family -> a module-name suffix only that family has. Presets of target modules
# (and of other methods' module choices) are written per family.
FAMILY_MARKERS = {
    "llama": "self_attn.q_proj",  # Llama, Mistral, Qwen2, Gemma, ...
    "bert": "attention.self.query",  # BERT, RoBERTa, MiniLM, ...
}


@contextmanager
def custom_code_refused_in_plain_words(model_path):
    """transformers refuses a model's own code unless trusted, in words for the developer calling it: say it for the user."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"the model at {model_path} ships its own Python code (auto_map in its config); workers run such code "
            "only for a base model whose trust_remote_code an admin has enabled in the catalogue"
        ) from error


def load_tokenizer(model_path, trust_remote_code=False):
    with custom_code_refused_in_plain_words(model_path):
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def load_model(run, label_names=None, pad_token_id=None, **from_pretrained_kwargs):
    """Load the base model for the run's task.

    In float32 unless `from_pretrained_kwargs` say otherwise (mixed precision is
    applied around the model); a method's `base_model_kwargs` come in there, e.g.
    QLoRA's quantization. The model's own code runs only if the run trusts it
    (False, not transformers' default None, which would ask on the terminal).
    """
    from_pretrained_kwargs = {"dtype": torch.float32, "trust_remote_code": run.trust_remote_code, **from_pretrained_kwargs}
    with custom_code_refused_in_plain_words(run.model_path):
        if run.spec.task == "sequence_classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                run.model_path,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: index for index, name in enumerate(label_names)},
                **from_pretrained_kwargs,
            )
            # A classifier over a decoder reads the last non-pad token, so it has to know the pad id.
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad_token_id
            return model
        return AutoModelForCausalLM.from_pretrained(run.model_path, **from_pretrained_kwargs)


def architecture_family(model):
    """'llama', 'bert' or None, judged by the module names the model actually has."""
    names = [name for name, _ in model.named_modules()]
    for family, marker in FAMILY_MARKERS.items():
        if any(name.endswith(marker) for name in names):
            return family
    return None


def linear_layer_names(model):
    """Full names of the layers that linear adapters can wrap."""
    # GPT-2 style models use Conv1D where others use nn.Linear.
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]


def count_parameters(model):
    """(trainable, total) parameters, counting the weights of a 4-bit layer as weights, not packed bytes."""
    trainable, total = 0, 0
    for parameter in model.parameters():
        count = parameter.numel()
        # bitsandbytes stores two 4-bit weights per byte of its storage dtype.
        if type(parameter).__name__ == "Params4bit":
            count *= 2 * parameter.element_size()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def weight_mismatches(found, expected, expected_as="expected"):
    """Why tensors `found` cannot load where `expected` are: [(problem, names)], empty when they fit."""
    wrong_shape = [
        f"{name} {tuple(found[name].shape)} ({expected_as} {tuple(tensor.shape)})"
        for name, tensor in expected.items()
        if name in found and found[name].shape != tensor.shape
    ]
    problems = (
        ("missing", sorted(expected.keys() - found.keys())),
        ("unexpected", sorted(found.keys() - expected.keys())),
        ("wrong shape", wrong_shape),
    )
    return [(problem, names) for problem, names in problems if names]
