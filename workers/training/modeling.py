"""Loading the base model and telling which architecture family it belongs to."""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

# Family -> a module-name suffix only that family has. Presets of target modules
# (and of other methods' module choices) are written per family.
FAMILY_MARKERS = {
    "llama": "self_attn.q_proj",  # Llama, Mistral, Qwen2, Gemma, ...
    "bert": "attention.self.query",  # BERT, RoBERTa, MiniLM, ...
}


def load_tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def load_model(run, label_names=None, pad_token_id=None):
    """Load the base model for the run's task, in float32 (mixed precision is applied around it)."""
    if run.spec.task == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            run.model_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: index for index, name in enumerate(label_names)},
            dtype=torch.float32,
        )
        # A classifier over a decoder reads the last non-pad token, so it has to know the pad id.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        return model
    return AutoModelForCausalLM.from_pretrained(run.model_path, dtype=torch.float32)


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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
