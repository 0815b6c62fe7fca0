"""Full fine-tuning through the method interface (apply, save, load), on the tiny random Llama
and the real MiniLM encoder, with a few plain training steps in the test itself."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from jobs.spec import FullFineTuningConfig
from workers.training.methods import METHODS, full
from workers.training.modeling import architecture_family, count_parameters
from tests.engine.steps import logits_of, train_steps

TEXTS = ["Every weight trains in full fine-tuning.", "It is the baseline the adapters are judged against."]





def test_registered_and_nothing_to_merge():
    assert METHODS["full"] is full
    assert not hasattr(full, "merge")
    assert "nothing to merge" in full.CANNOT_MERGE


def test_every_weight_trains_and_the_saved_model_reproduces_it(tiny_llama_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    model.requires_grad_(False)  # whatever state it comes in, full fine-tuning trains everything
    model = full.apply(model, FullFineTuningConfig(), "causal_lm_sft", architecture_family(model))
    trainable, total = count_parameters(model)
    assert trainable == total

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = train_steps(model, batch, steps=8, learning_rate=1e-3)
    assert losses[-1] < 0.8 * losses[0], losses

    trained = logits_of(model, batch)
    full.save(model, tmp_path, "tiny-random-llama", label_names=None)
    assert {"config.json", "model.safetensors"} <= {path.name for path in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))

    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    assert not torch.allclose(logits_of(fresh_base, batch), trained, atol=1e-3)
    reloaded = full.load(fresh_base, tmp_path)
    assert type(reloaded) is type(fresh_base) and not reloaded.training
    torch.testing.assert_close(logits_of(reloaded, batch), trained, rtol=0, atol=1e-5)


def test_a_classifier_keeps_its_label_names(minilm, tmp_path):
    label_names = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label=dict(enumerate(label_names)), dtype=torch.float32
    )
    model = full.apply(model, FullFineTuningConfig(), "sequence_classification", architecture_family(model))
    assert count_parameters(model)[0] == count_parameters(model)[1]
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(["a fine film", "a dull film"], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([1, 0])
    train_steps(model, batch, steps=2, learning_rate=1e-4)

    trained = logits_of(model, batch)
    full.save(model, tmp_path, "all-MiniLM-L6-v2", label_names=label_names)
    assert json.loads((tmp_path / "labels.json").read_text()) == label_names

    torch.manual_seed(1)  # another random head on the base: the saved one has to replace it
    reloaded = full.load(AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2), tmp_path)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    torch.testing.assert_close(logits_of(reloaded, batch), trained, rtol=0, atol=1e-5)
