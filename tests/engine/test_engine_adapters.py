"""Bottleneck adapters through the method interface (apply, save, load), on the tiny random Llama
and the real MiniLM encoder, with a few plain training steps in the test itself."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from jobs.spec import AdapterConfig
from workers.training.methods import METHODS, adapter
from workers.training.methods.bottleneck import adapter_modules
from workers.training.modeling import architecture_family, count_parameters
from tests.engine.steps import logits_of, train_steps

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
ADAPTERS_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}
TEXTS = [
    "The adapter learns the task while the base model stays frozen.",
    "A small bottleneck between two projections is enough to steer a large model.",
    "Houlsby puts one after attention and one after the feed-forward block.",
    "Parallel adapters sit beside the feed-forward block instead.",
]
REVIEWS = [
    ("a wonderful film, warm and funny", 1),
    ("dull, slow and far too long", 0),
    ("I loved every minute of it", 1),
    ("a tedious mess with no story", 0),
    ("great acting and a clever plot", 1),
    ("boring from start to finish", 0),
]


def per_adapter_parameters(hidden_size, bottleneck_size):
    """Down (d·m weights + m biases) and up (m·d weights + d biases)."""
    return 2 * hidden_size * bottleneck_size + bottleneck_size + hidden_size


def with_adapters(model, task="causal_lm_sft", **config):
    return adapter.apply(model, AdapterConfig(**config), task, architecture_family(model))





@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_path):
    """tiny_llama() -> a fresh copy of the base model, always the same weights."""
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def text_batch(tiny_llama_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


@pytest.fixture(scope="module")
def minilm_classifier(minilm):
    """minilm_classifier(seed) -> MiniLM with a fresh two-label head, its random init set by the seed."""

    def load(seed=0):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2, dtype=torch.float32)

    return load


@pytest.fixture(scope="module")
def review_batch(minilm):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    texts, labels = zip(*REVIEWS)
    return {**tokenizer(list(texts), padding=True, return_tensors="pt"), "labels": torch.tensor(labels)}


def test_registered_and_cannot_merge():
    assert METHODS["adapter"] is adapter
    assert not hasattr(adapter, "merge")
    assert "non-linearity" in adapter.CANNOT_MERGE and "latency" in adapter.CANNOT_MERGE


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fresh_adapters_leave_the_outputs_exactly_unchanged(placement, tiny_llama, text_batch):
    model = tiny_llama()
    before = logits_of(model, text_batch)
    with_adapters(model, placement=placement)
    assert torch.equal(logits_of(model, text_batch), before)


@pytest.mark.parametrize(
    ("placement", "config", "bottleneck_size"),
    [
        ("houlsby", {}, 256 // 16),
        ("pfeiffer", {"reduction_factor": 8}, 256 // 8),
        ("parallel", {"bottleneck_size": 7}, 7),
        ("houlsby", {"reduction_factor": 1000}, 1),  # never a bottleneck of zero
    ],
)
def test_only_the_adapters_train_and_their_count_is_the_formula(placement, config, bottleneck_size, tiny_llama):
    model = tiny_llama()
    hidden_size, num_layers = model.config.hidden_size, model.config.num_hidden_layers
    with_adapters(model, placement=placement, **config)

    trainable, _ = count_parameters(model)
    adapters = ADAPTERS_PER_LAYER[placement] * num_layers
    assert trainable == adapters * per_adapter_parameters(hidden_size, bottleneck_size)
    trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(".adapter_" in name for name in trainable_names)
    assert len(trainable_names) == adapters * 4  # down and up, weight and bias each


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_lowers_the_loss_and_the_artifact_reproduces_the_model(placement, tiny_llama, text_batch, tmp_path):
    model = with_adapters(tiny_llama(), placement=placement, activation="silu", scaling=2.0)
    losses = train_steps(model, text_batch, steps=12, learning_rate=1e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    # Every adapter is in the forward pass: its up-projection got gradients and left zero.
    assert all(module.up.weight.abs().sum() > 0 for module in adapter_modules(model).values())
    # The base stayed frozen: every weight it had is still the base model's.
    trained_state = model.state_dict()
    assert all(torch.equal(trained_state[name], tensor) for name, tensor in tiny_llama().state_dict().items())

    trained = logits_of(model, text_batch)
    adapter.save(model, tmp_path, "tiny-random-llama", label_names=None)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {
        "type": "bottleneck_adapter",
        "base_model_name_or_path": "tiny-random-llama",
        "placement": placement,
        "bottleneck_size": 16,
        "activation": "silu",
        "scaling": 2.0,
        "architecture_family": "llama",
        "hidden_size": 256,
        "num_layers": 4,
        "task": "causal_lm_sft",
    }
    assert "adapter.load(base" in (tmp_path / "README.md").read_text()

    reloaded = adapter.load(tiny_llama(), tmp_path)
    assert not reloaded.training
    torch.testing.assert_close(logits_of(reloaded, text_batch), trained, rtol=0, atol=1e-5)


def test_a_bottleneck_wider_than_the_model_is_refused(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match="bottleneck_size 257 is larger than this model's hidden size 256"):
        with_adapters(model, bottleneck_size=257)
    assert not adapter_modules(model) and all(p.requires_grad for p in model.parameters())  # left as it was


def test_an_unknown_architecture_is_refused_with_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="support the llama and bert architecture families"):
        with_adapters(gpt2)


def test_adapters_go_onto_a_base_model_once(tiny_llama):
    model = with_adapters(tiny_llama())
    with pytest.raises(ValueError, match="already has a bottleneck adapter"):
        with_adapters(model)


@pytest.fixture
def saved_pfeiffer(tiny_llama, tmp_path):
    directory = tmp_path / "pfeiffer"
    adapter.save(with_adapters(tiny_llama(), placement="pfeiffer"), directory, "tiny-random-llama")
    return directory


def assert_load_fails(base, directory, error, message):
    with pytest.raises(error, match=message):
        adapter.load(base, directory)
    assert not any(".adapter_" in name for name, _ in base.named_modules())  # the base was not touched


def test_load_refuses_a_directory_without_an_adapter(tiny_llama, tmp_path):
    assert_load_fails(tiny_llama(), tmp_path, FileNotFoundError, "no adapter_config.json in")


def test_load_refuses_another_kind_of_artifact(tiny_llama, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert_load_fails(tiny_llama(), tmp_path, ValueError, "describes a 'LORA' artifact, not a 'bottleneck_adapter'")


def test_load_refuses_weights_that_do_not_match_the_config(tiny_llama, saved_pfeiffer):
    config_path = saved_pfeiffer / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"pfeiffer"', '"houlsby"'))
    assert_load_fails(
        tiny_llama(), saved_pfeiffer, ValueError, r"does not match its adapter_config.json: missing: model\.layers\.0\."
    )


def test_load_refuses_weights_of_the_wrong_shape(tiny_llama, saved_pfeiffer):
    config_path = saved_pfeiffer / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"bottleneck_size": 16', '"bottleneck_size": 8'))
    assert_load_fails(tiny_llama(), saved_pfeiffer, ValueError, r"wrong shape: .*\(16, 256\) \(expected \(8, 256\)\)")


def test_load_refuses_another_base_model(minilm_classifier, saved_pfeiffer):
    assert_load_fails(
        minilm_classifier(), saved_pfeiffer, ValueError, "trained on a llama-style model; this base model .* is bert"
    )


@pytest.mark.parametrize("placement", PLACEMENTS)
@torch.no_grad()
def test_bert_adapters_sit_before_each_layernorm(placement, minilm_classifier):
    """One BERT layer computed by hand: serial adapters on the dense outputs, the parallel one on the FFN input."""
    model = with_adapters(minilm_classifier(), task="sequence_classification", placement=placement).eval()
    for module in adapter_modules(model).values():
        torch.nn.init.normal_(module.up.weight, std=0.05)
    layer = model.bert.encoder.layer[0]

    def serial(site, hidden_states):
        site_adapter = getattr(layer, f"adapter_{site}", None)
        return hidden_states if site_adapter is None else hidden_states + site_adapter(hidden_states)

    def dense(linear, hidden_states):  # the layer itself, without the adapter hooked onto it
        return torch.nn.functional.linear(hidden_states, linear.weight, linear.bias)

    x = torch.randn(2, 5, model.config.hidden_size)
    attention = layer.attention.output
    attention_output = attention.LayerNorm(
        serial("after_attention", dense(attention.dense, layer.attention.self(x)[0])) + x
    )
    ffn_output = serial("after_ffn", dense(layer.output.dense, layer.intermediate(attention_output)))
    if placement == "parallel":
        ffn_output = ffn_output + layer.adapter_beside_ffn(attention_output)
    expected = layer.output.LayerNorm(ffn_output + attention_output)

    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_minilm_classifier_trains_adapters_and_head_and_reloads(placement, minilm_classifier, review_batch, tmp_path):
    model = minilm_classifier(seed=0)
    before = logits_of(model, review_batch)
    with_adapters(model, task="sequence_classification", placement=placement)
    assert torch.equal(logits_of(model, review_batch), before)

    hidden_size, num_layers = model.config.hidden_size, model.config.num_hidden_layers
    head = hidden_size * 2 + 2
    adapters = ADAPTERS_PER_LAYER[placement] * num_layers
    assert count_parameters(model)[0] == adapters * per_adapter_parameters(hidden_size, hidden_size // 16) + head

    head_before = model.classifier.weight.detach().clone()
    losses = train_steps(model, review_batch, steps=10, learning_rate=3e-3)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(model.classifier.weight, head_before)

    trained = logits_of(model, review_batch)
    adapter.save(model, tmp_path, "all-MiniLM-L6-v2", label_names=["negative", "positive"])
    assert json.loads((tmp_path / "labels.json").read_text()) == ["negative", "positive"]
    assert "num_labels=2" in (tmp_path / "README.md").read_text()
    # Another seed gives the fresh base another random head: the saved one has to replace it.
    reloaded = adapter.load(minilm_classifier(seed=1), tmp_path)
    torch.testing.assert_close(logits_of(reloaded, review_batch), trained, rtol=0, atol=1e-5)
