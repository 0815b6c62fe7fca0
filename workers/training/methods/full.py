"""Full fine-tuning: every weight trains. The baseline the other methods are judged against.

The artifact is the whole model as transformers saves it (config.json + model.safetensors),
which loads on its own with `from_pretrained`, no base model needed.
"""

from jobs.spec import CANNOT_MERGE_REASONS
from workers.training.export import write_label_names

CANNOT_MERGE = CANNOT_MERGE_REASONS["full"]  # the same sentence the form and the API show


def apply(model, config, task, family):
    return model.requires_grad_(True)


def save(model, directory, base_model_name, label_names=None):
    # transformers 5 writes safetensors only; its config.json keeps the label names as id2label.
    model.save_pretrained(directory)
    write_label_names(directory, label_names)


def load(base_model, directory):
    """The saved model, of the base model's class and dtype; the base model's weights are not used."""
    return type(base_model).from_pretrained(directory, dtype=base_model.dtype).eval()
