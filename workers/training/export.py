"""Writing what a run leaves behind: the adapter and the checkpoints on the way.

Artifacts are safetensors and JSON only, in the layout that
`PeftModel.from_pretrained(base_model, directory)` reads unchanged.
"""

import json
from pathlib import Path

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LABELS_FILE = "labels.json"
TRAINER_STATE_FILE = "trainer_state.json"


def save_adapter(model, directory, base_model_name, label_names=None):
    """Save the trainable part of `model` (a peft model) into `directory`."""
    directory = Path(directory)
    # The adapter config would otherwise name the base model by its path on this
    # worker, which means nothing to whoever downloads the adapter.
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_name
    # The engine never resizes embeddings, and "auto" would ask the hub whether the base model's vocabulary changed.
    model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    # peft adds a README model card; the artifact keeps to safetensors + JSON.
    (directory / "README.md").unlink(missing_ok=True)
    if label_names is not None:
        # The label names in id order: a classifier's outputs mean nothing without them.
        (directory / LABELS_FILE).write_text(json.dumps(label_names))
    return directory


def save_checkpoint(model, outdir, step, epoch, base_model_name, label_names=None):
    """Save the adapter so far plus the step it was taken at; return its path relative to outdir."""
    relative = Path(CHECKPOINTS_DIR) / f"step-{step:06d}"
    directory = save_adapter(model, Path(outdir) / relative, base_model_name, label_names)
    (directory / TRAINER_STATE_FILE).write_text(json.dumps({"step": step, "epoch": epoch}))
    return relative.as_posix()
