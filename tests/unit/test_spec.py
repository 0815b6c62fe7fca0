import pytest
from pydantic import ValidationError

from jobs.spec import JobSpec, TrainingRun


def error_fields(data):
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(data)
    return {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}


def test_defaults_make_a_lora_job():
    spec = JobSpec.model_validate({"base_model": "tiny-random-llama", "dataset": 3})
    assert spec.task == "causal_lm_sft"
    assert spec.method.type == "lora"
    assert (spec.method.r, spec.method.alpha, spec.method.target_modules) == (8, 16, "attention_qv")
    assert spec.hyperparameters.learning_rate == 2e-4


def test_bad_values_are_refused_with_the_field_named():
    fields = error_fields({
        "base_model": "m",
        "dataset": 1,
        "method": {"r": 0, "dropout": 1.5},
        "hyperparameters": {"learning_rate": -1, "batch_size": 0},
    })
    assert fields == {"method.lora.r", "method.lora.dropout", "hyperparameters.learning_rate", "hyperparameters.batch_size"}


def test_unknown_fields_are_refused_not_ignored():
    assert error_fields({"base_model": "m", "dataset": 1, "hyperparameters": {"learnin_rate": 0.1}}) == {
        "hyperparameters.learnin_rate"
    }


def test_missing_base_model_and_unknown_task():
    assert error_fields({"dataset": 1, "task": "translation"}) == {"base_model", "task"}


def test_custom_target_modules_must_name_something():
    with pytest.raises(ValidationError, match="target_modules"):
        JobSpec.model_validate({"base_model": "m", "dataset": 1, "method": {"target_modules": [" ", ""]}})
    spec = JobSpec.model_validate({"base_model": "m", "dataset": 1, "method": {"target_modules": [" q_proj", "v_proj "]}})
    assert spec.method.target_modules == ["q_proj", "v_proj"]


def test_spec_round_trips_through_json():
    spec = JobSpec.model_validate({"base_model": "m", "dataset": 1, "hyperparameters": {"max_steps": 30}})
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_each_method_has_its_own_settings_checked():
    assert error_fields({"base_model": "m", "dataset": 1, "method": {"type": "qlora", "bits": 3}}) == {"method.qlora.bits"}
    assert error_fields({"base_model": "m", "dataset": 1, "method": {"type": "adapter", "activation": "tanh"}}) == {
        "method.adapter.activation"
    }
    assert error_fields({"base_model": "m", "dataset": 1, "method": {"type": "prefix", "r": 8}}) == {"method.prefix.r"}
    assert error_fields({"base_model": "m", "dataset": 1, "method": {"type": "sparse"}}) == {"method"}


def test_a_merged_export_is_refused_for_methods_that_cannot_merge():
    with pytest.raises(ValidationError, match="export_merged: Bottleneck adapters have a non-linearity"):
        JobSpec.model_validate({"base_model": "m", "dataset": 1, "method": {"type": "adapter"}, "export_merged": True})
    spec = JobSpec.model_validate({"base_model": "m", "dataset": 1, "method": {"type": "ia3"}, "export_merged": True})
    assert spec.export_merged and spec.method.target_modules == "default"


def test_gpus_is_a_top_level_count_from_one_to_eight():
    assert JobSpec.model_validate({"base_model": "m", "dataset": 1}).gpus == 1
    assert JobSpec.model_validate({"base_model": "m", "dataset": 1, "gpus": 8}).gpus == 8
    for bad in (0, 9, -1, "two", 1.5):
        assert error_fields({"base_model": "m", "dataset": 1, "gpus": bad}) == {"gpus"}
    # Not a hyperparameter: the engine trains each process the same way, the launcher decides how many.
    assert error_fields({"base_model": "m", "dataset": 1, "hyperparameters": {"gpus": 2}}) == {"hyperparameters.gpus"}


def test_a_qlora_run_cannot_be_sharded():
    spec = JobSpec(base_model="m", dataset=1, method={"type": "qlora"}, gpus=2)
    files = {"model_path": "/m", "dataset_path": "/d.jsonl", "dataset_format": "text"}
    with pytest.raises(ValidationError, match="shard_weights: QLoRA's 4-bit base weights cannot be sharded"):
        TrainingRun(spec=spec, shard_weights=True, **files)
    lora = JobSpec(base_model="m", dataset=1, method={"type": "lora"}, gpus=2)
    assert TrainingRun(spec=lora, shard_weights=True, **files).shard_weights
