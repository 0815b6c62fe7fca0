"""The forgetting check: the loss on text from the base model's own domain, before and after training."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from jobs.spec import LoraConfig
from workers.training.data import IGNORE_INDEX, tokenize_sft
from workers.training.modeling import load_tokenizer

REFERENCE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold.",
    "Where there is smoke there is fire.",
    "Actions speak louder than words.",
]


@pytest.fixture(scope="module")
def reference_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "proverbs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in REFERENCE_TEXTS))
    return path


@pytest.fixture(scope="module")
def checked_run(tiny_llama_path, instruction_set, reference_set, make_run, run_engine, tmp_path_factory):
    run = make_run(
        tiny_llama_path, instruction_set, "prompt_completion",
        method=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all_linear"),
        max_steps=30, batch_size=16, learning_rate=1e-2, max_seq_length=64, eval_fraction=0.1,
    )
    run.reference_dataset_path, run.reference_dataset_format = str(reference_set), "text"
    result = run_engine(run, tmp_path_factory.mktemp("forgetting"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def loss_on_references(model, tokenizer):
    """The mean loss over every predicted token of the reference texts, one text at a time."""
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for text in REFERENCE_TEXTS:
            example = tokenize_sft([(text, True)], tokenizer, 64)
            input_ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            count = (labels[:, 1:] != IGNORE_INDEX).sum().item()
            loss_sum += model(input_ids=input_ids, labels=labels).loss.item() * count
            tokens += count
    return loss_sum / tokens


def test_the_base_models_loss_is_measured_before_and_the_adapters_after(checked_run, tiny_llama_path):
    finished = checked_run.of("finished")[0]
    tokenizer = load_tokenizer(tiny_llama_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    assert finished["reference_loss_before"] == pytest.approx(loss_on_references(base, tokenizer), rel=1e-5)

    tuned = PeftModel.from_pretrained(base, checked_run.outdir / "adapter").eval()
    assert finished["reference_loss_after"] == pytest.approx(loss_on_references(tuned, tokenizer), rel=1e-4)
    assert finished["reference_loss_after"] != pytest.approx(finished["reference_loss_before"], rel=1e-3)
    assert any("forgetting check" in line["message"] for line in checked_run.of("log"))


def test_without_a_reference_set_nothing_is_measured(tiny_llama_path, instruction_set, make_run, run_engine, tmp_path):
    run = make_run(tiny_llama_path, instruction_set, "prompt_completion", max_steps=2, batch_size=4, max_seq_length=32)
    finished = run_engine(run, tmp_path).of("finished")[0]
    assert finished["reference_loss_before"] is None and finished["reference_loss_after"] is None
