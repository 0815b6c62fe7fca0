"""Writing what a run leaves behind: the method's artifact and a merged model (checkpoints: checkpoint.py).

Artifacts are safetensors and JSON only. Each method writes its own artifact
(peft-based ones in the layout `PeftModel.from_pretrained(base_model, directory)`
reads unchanged); this module decides where things go.
"""

import json
from pathlib import Path

ADAPTER_DIR = "adapter"  # every method's main artifact, a full fine-tuned model included
MERGED_DIR = "merged"
LABELS_FILE = "labels.json"


def write_label_names(directory, label_names):
    """The label names in id order, beside a classifier's artifact: its outputs mean nothing without them."""
    if label_names is not None:
        (Path(directory) / LABELS_FILE).write_text(json.dumps(label_names))


def save_merged(model, tokenizer, directory):
    """A standalone model, loadable with plain `from_pretrained`: weights in safetensors, config, tokenizer."""
    model.save_pretrained(directory)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(directory)

