"""Writing what a run leaves behind: the method's artifact, the checkpoints on the way, a merged model.

Artifacts are safetensors and JSON only. Each method writes its own artifact
(peft-based ones in the layout `PeftModel.from_pretrained(base_model, directory)`
reads unchanged); this module decides where things go.
"""

import json
from pathlib import Path

ADAPTER_DIR = "adapter"  # every method's main artifact, a full fine-tuned model included
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"
LABELS_FILE = "labels.json"
TRAINER_STATE_FILE = "trainer_state.json"


def write_label_names(directory, label_names):
    """The label names in id order, beside a classifier's artifact: its outputs mean nothing without them."""
    if label_names is not None:
        (Path(directory) / LABELS_FILE).write_text(json.dumps(label_names))


def save_checkpoint(method, model, outdir, step, epoch, base_model_name, label_names=None):
    """Save the method's artifact so far plus the step it was taken at; return its path relative to outdir."""
    relative = Path(CHECKPOINTS_DIR) / f"step-{step:06d}"
    directory = Path(outdir) / relative
    method.save(model, directory, base_model_name, label_names)
    (directory / TRAINER_STATE_FILE).write_text(json.dumps({"step": step, "epoch": epoch}))
    return relative.as_posix()


def save_merged(model, tokenizer, directory):
    """A standalone model, loadable with plain `from_pretrained`: weights in safetensors, config, tokenizer."""
    model.save_pretrained(directory)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(directory)

