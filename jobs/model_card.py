"""The README.md that goes into every downloaded adapter and merged model: what it is, how well it did, how to load it."""

import json

from .spec import METHOD_LABELS

AUTO_CLASSES = {"causal_lm_sft": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification"}
# Job field -> how the card names it; shown when measured.
MEASUREMENTS = {
    "train_loss": "train loss (mean of the last steps)",
    "eval_loss": "eval loss",
    "eval_accuracy": "eval accuracy",
    "eval_f1": "eval macro-F1",
    "perplexity": "eval perplexity",
    "reference_loss_before": "reference loss before training (forgetting check)",
    "reference_loss_after": "reference loss after training",
    "trainable_params": "trainable parameters",
    "total_params": "parameters in all",
    "tokens_seen": "tokens trained on",
    "tokens_per_sec": "tokens per second",
    "mfu": "model FLOPs utilisation (share of the GPUs' dense bf16 peak)",
    "peak_memory_mb": "peak memory (MiB)",
    "wall_time_s": "wall time (s)",
    "latency_ms": "inference latency, ms per batch",
    "latency_merged_ms": "inference latency merged, ms per batch",
}


def model_card(job, kind, method_readme=""):
    """Markdown for the artifact of `kind` ("adapter" or "merged"); `method_readme` is what the method wrote itself."""
    spec = job.spec
    method = spec["method"]
    method_type = method.get("type", "lora")
    rows = "\n".join(
        f"| {label} | {_number(getattr(job, field))} |"
        for field, label in MEASUREMENTS.items()
        if getattr(job, field) is not None
    )
    return f"""# {job.display_name}: {METHOD_LABELS[method_type]} of {job.base_model.name}

Fine-tuned with TuneDeck (job {job.pk}, team {job.team.name}) on the dataset
"{job.dataset.name}", {job.step} steps.

| measurement | value |
| --- | --- |
{rows}

## Load it

{_load_snippet(job, kind, method_type)}
{method_readme}
## The job's spec

```json
{json.dumps(spec, indent=2)}
```
"""


def _load_snippet(job, kind, method_type):
    auto_class = AUTO_CLASSES[job.base_model.task]
    base = job.base_model.name
    if kind == "merged" or method_type == "full":
        return f"""```python
from transformers import {auto_class}, AutoTokenizer

model = {auto_class}.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```
"""
    if method_type == "adapter":
        return "Bottleneck adapters load with TuneDeck's own loader (below).\n"
    imports, labels = "", ""
    if job.base_model.task == "sequence_classification":
        imports = "import json\n"
        labels = ', num_labels=len(json.load(open("path/to/this/directory/labels.json")))'
    return f"""```python
{imports}from peft import PeftModel
from transformers import {auto_class}

base = {auto_class}.from_pretrained("{base}"{labels})  # the base model "{base}" of the catalogue
model = PeftModel.from_pretrained(base, "path/to/this/directory")
```
"""


def _number(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
