"""LoRA sequence classification on the real pretrained MiniLM encoder, through the real command line."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from jobs.datasets import load_examples
from jobs.demo_data import write_classification_set
from jobs.spec import LoraConfig


@pytest.fixture(scope="module")
def classification_result(minilm, classification_set, make_run, run_engine, tmp_path_factory):
    run = make_run(
        minilm,
        classification_set,
        "classification",
        task="sequence_classification",
        method=LoraConfig(r=8, alpha=16, target_modules="attention_qv"),
        epochs=2,
        batch_size=16,
        learning_rate=2e-3,
        max_seq_length=64,
        eval_fraction=0.2,
        checkpoint_every=1000,
    )
    result = run_engine(run, tmp_path_factory.mktemp("classification"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_classifier_learns_the_rule(classification_result):
    started = classification_result.of("started")[0]
    assert (started["train_rows"], started["eval_rows"]) == (320, 80)
    assert started["total_steps"] == 2 * 20  # two epochs of 320 rows in batches of 16

    finished = classification_result.of("finished")[0]
    # Chance is 0.5; the opinion word decides the label, and the runs measured so far reach 1.0.
    assert finished["eval_accuracy"] >= 0.85
    assert classification_result.of("eval")[-1]["eval_accuracy"] == finished["eval_accuracy"]


def test_adapter_holds_the_classifier_head_and_the_label_names(classification_result, minilm, tmp_path):
    adapter = classification_result.outdir / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
    ]
    label_names = json.loads((adapter / "labels.json").read_text())
    assert label_names == ["negative", "positive"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and set(config["target_modules"]) == {"query", "value"}

    # Reloaded as a user would, it classifies rows it has never seen.
    base = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=len(label_names))
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    fresh = load_examples(write_classification_set(tmp_path / "fresh.csv", rows=40, seed=7), "classification")
    texts, labels = zip(*fresh)
    with torch.no_grad():
        logits = model(**tokenizer(list(texts), padding=True, return_tensors="pt")).logits
    predicted = [label_names[index] for index in logits.argmax(dim=-1).tolist()]
    accuracy = sum(p == label for p, label in zip(predicted, labels)) / len(labels)
    assert accuracy >= 0.85
