"""Methods compared on real data: SST-2 sentiment with the pretrained MiniLM encoder, on CPU.

Every method gets the same budget (rows, steps, batch size, sequence length); each is
trained by the real engine CLI on rows of ../shared/data/sst2/train.tsv and scored on
the 436 whole sentences of dev.tsv. TUNEDECK_QUALITY_LONG=1 runs a longer budget.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from jobs.datasets import load_examples
from jobs.spec import JobSpec, TrainingRun
from tests.conftest import REPO
from workers.training.tiny_model import minilm_path

LONG = os.environ.get("TUNEDECK_QUALITY_LONG") == "1"
TRAIN_ROWS = 20_000 if LONG else 4_000
BUDGET = {"max_steps": 600 if LONG else 125, "batch_size": 32, "max_seq_length": 64, "seed": 0, "warmup_steps": 10}
CLEAR_MARGIN = 0.15  # accuracy points above the untrained head that count as clearly learnt

# Settings per method (learning rates tried on this budget: lora 1e-3/2e-3, adapter 1e-3/2e-3,
# ia3 1e-2/3e-2; the best kept); the step budget is the same for all.
METHODS = {
    "full": ({"type": "full"}, 5e-5),
    "lora": ({"type": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "attention_qkvo"}, 2e-3),
    "adapter": ({"type": "adapter", "placement": "houlsby", "reduction_factor": 16}, 2e-3),
    "ia3": ({"type": "ia3"}, 1e-2),
}


@pytest.fixture(scope="module")
def sst2_files(shared_data, tmp_path_factory):
    """A shuffled sample of the training phrases, and the dev sentences, with their text columns named."""
    folder = tmp_path_factory.mktemp("sst2")
    lines = (shared_data / "sst2" / "train.tsv").read_text().splitlines()
    rows = lines[1:]
    random.Random(0).shuffle(rows)
    train = folder / "train.tsv"
    train.write_text("\n".join([lines[0]] + rows[:TRAIN_ROWS]) + "\n")
    return {"train": train, "dev": shared_data / "sst2" / "dev.tsv"}


def train_with(method, learning_rate, files, outdir):
    spec = JobSpec.model_validate({
        "base_model": "all-MiniLM-L6-v2", "dataset": 1, "validation_dataset": 2, "task": "sequence_classification",
        "method": method, "hyperparameters": BUDGET | {"learning_rate": learning_rate},
    })
    run = TrainingRun(
        spec=spec, model_path=str(minilm_path()),
        dataset_path=str(files["train"]), dataset_format="classification", column_map={"text": "sentence"},
        eval_dataset_path=str(files["dev"]), eval_dataset_format="classification", eval_column_map={"text": "content"},
    )
    outdir.mkdir()
    (outdir / "spec.json").write_text(run.model_dump_json())
    result = subprocess.run(
        [sys.executable, "-m", "workers.training", str(outdir / "spec.json"), str(outdir)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, f"{events[-1:]}\n{result.stderr[-2000:]}"
    return next(event for event in events if event["event"] == "finished")


@pytest.fixture(scope="module")
def untrained_head_accuracy(sst2_files):
    """The encoder with a fresh, untrained classification head: the floor every method must clear."""
    examples = load_examples(sst2_files["dev"], "classification", {"text": "content"})
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(BUDGET["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    texts, labels = zip(*examples)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=BUDGET["max_seq_length"], return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    return (predicted == torch.tensor([int(label) for label in labels])).float().mean().item()


@pytest.fixture(scope="module")
def results(sst2_files, tmp_path_factory):
    outcomes = {}
    for name, (method, learning_rate) in METHODS.items():
        finished = train_with(method, learning_rate, sst2_files, tmp_path_factory.mktemp("runs") / name)
        outcomes[name] = finished
        print(
            f"\nSST-2 dev | {name:8s} | accuracy {finished['eval_accuracy']:.3f} | macro-F1 {finished['eval_f1']:.3f} "
            f"| trainable {100 * finished['trainable_params'] / finished['total_params']:.3f}% "
            f"({finished['trainable_params']:,}) | lr {learning_rate} | {finished['wall_time_s']:.0f} s"
        )
    return outcomes


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_clearly_beats_the_untrained_head(method, results, untrained_head_accuracy):
    accuracy = results[method]["eval_accuracy"]
    assert accuracy >= untrained_head_accuracy + CLEAR_MARGIN, (
        f"{method}: {accuracy:.3f} on SST-2 dev vs {untrained_head_accuracy:.3f} for the untrained head"
    )


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3"])
def test_peft_methods_train_under_one_percent_of_the_weights(method, results):
    finished = results[method]
    assert finished["trainable_params"] / finished["total_params"] < 0.01
    assert results["full"]["trainable_params"] == results["full"]["total_params"]
