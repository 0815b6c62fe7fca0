"""Submission refuses a method that cannot work on the chosen base model, naming why."""

import pytest

from jobs.models import BaseModel
from jobs.spec import JobSpec
from jobs.submission import SubmissionError, check_method_fits_model

CONV_ONLY = {"family": None, "hidden_size": 64, "linear_modules": []}
LLAMA = {"family": "llama", "hidden_size": 256, "linear_modules": ["layers.*.self_attn.q_proj", "layers.*.mlp.down_proj"]}


def method(**config):
    return JobSpec.model_validate({"base_model": "m", "dataset": 1, "method": config}).method


@pytest.fixture
def model(db):
    def make(info):
        return BaseModel.objects.create(name=f"model-{BaseModel.objects.count()}", path="/x", task="causal_lm_sft",
                                        architecture="llama", architecture_info=info)
    return make


def refusal(base_model, config):
    with pytest.raises(SubmissionError) as caught:
        check_method_fits_model(base_model, config)
    return caught.value.field, caught.value.message


def test_quantizing_a_model_without_linear_layers_is_refused(model):
    base = model(CONV_ONLY)
    assert refusal(base, method(type="qlora", target_modules=["conv"])) == (
        "target_modules", f"conv not found in {base.name}; its linear layers are: ")
    field, message = refusal(model(dict(CONV_ONLY, family="llama")), method(type="qlora"))
    assert field == "bits" and "QLoRA quantizes linear layers" in message and "has none" in message


def test_a_bottleneck_wider_than_the_model_is_refused(model):
    base = model(LLAMA)
    assert refusal(base, method(type="adapter", bottleneck_size=257)) == (
        "bottleneck_size",
        f"bottleneck_size 257 is larger than {base.name}'s hidden size 256; a bottleneck must be smaller",
    )
    check_method_fits_model(base, method(type="adapter", bottleneck_size=64))


def test_custom_modules_are_checked_by_suffix_and_presets_need_a_known_family(model):
    base = model(LLAMA)
    check_method_fits_model(base, method(type="lora", target_modules=["q_proj", "mlp.down_proj"]))
    assert refusal(base, method(type="ia3", target_modules=["k_proj"]))[1] == (
        f"k_proj not found in {base.name}; its linear layers are: down_proj, q_proj")
    unknown_family = model(dict(LLAMA, family=None, hidden_size=128))
    field, message = refusal(unknown_family, method(type="dora"))
    assert field == "target_modules" and message.startswith("presets are defined for Llama- and BERT-style models")
