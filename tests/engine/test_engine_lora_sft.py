"""LoRA supervised fine-tuning of the tiny Llama, through the real command line."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from jobs.spec import LoraConfig
from workers.training.data import load_training_data, make_loader
from workers.training.loop import train
from workers.training.modeling import load_tokenizer
from workers.training.progress import Progress

STEPS = 60
CHECKPOINT_EVERY = 30

EVENT_KEYS = {
    "started": {
        "resumed_from_step", "total_steps", "trainable_params", "total_params", "device", "gpus", "train_rows",
        "eval_rows",
    },
    "step": {
        "step", "epoch", "train_loss", "learning_rate", "tokens_per_sec", "tokens_seen", "mfu", "gpu_memory_mb",
        "cpu_memory_mb",
    },
    "eval": {"step", "eval_loss", "eval_accuracy"},
    "checkpoint": {"step", "path"},
    "artifact": {"kind", "path"},
    "finished": {
        "steps", "train_loss", "eval_loss", "eval_accuracy", "eval_f1", "perplexity", "wall_time_s",
        "trainable_params", "total_params", "tokens_per_sec", "mfu", "peak_memory_mb", "artifact_bytes", "latency_ms",
        "latency_merged_ms", "reference_loss_before", "reference_loss_after",
    },
    "log": {"message"},
}


@pytest.fixture(scope="module")
def sft_result(tiny_llama_path, instruction_set, make_run, run_engine, tmp_path_factory):
    run = make_run(
        tiny_llama_path,
        instruction_set,
        "prompt_completion",
        method=LoraConfig(r=16, alpha=32, target_modules="all_linear"),
        max_steps=STEPS,
        batch_size=16,
        learning_rate=5e-3,
        max_seq_length=64,
        eval_fraction=0.1,
        eval_every=20,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    result = run_engine(run, tmp_path_factory.mktemp("sft"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_stdout_carries_only_the_documented_progress_events(sft_result):
    assert sft_result.events[0]["event"] == "started"
    assert sft_result.events[-1]["event"] == "finished"
    for line in sft_result.events:
        assert set(line) - {"event"} == EVENT_KEYS[line["event"]], line


def test_metrics_file_records_the_same_lines(sft_result):
    recorded = (sft_result.outdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in recorded] == sft_result.events


def test_every_step_is_reported(sft_result):
    started = sft_result.of("started")[0]
    assert started["total_steps"] == STEPS
    assert started["device"] == "cpu" and started["gpus"] == 0
    assert started["train_rows"] + started["eval_rows"] == 400
    assert 0 < started["trainable_params"] < started["total_params"]

    steps = sft_result.of("step")
    assert [line["step"] for line in steps] == list(range(1, STEPS + 1))
    tokens_seen = [line["tokens_seen"] for line in steps]
    assert tokens_seen == sorted(tokens_seen) and tokens_seen[0] > 0
    assert all(line["tokens_per_sec"] > 0 and line["cpu_memory_mb"] > 0 for line in steps)
    assert all(line["gpu_memory_mb"] is None and line["mfu"] is None for line in steps)
    # Linear decay from the learning rate to zero, no warmup asked for.
    assert steps[0]["learning_rate"] == pytest.approx(5e-3)
    assert steps[-1]["learning_rate"] < steps[0]["learning_rate"] / 10


def test_loss_goes_down(sft_result):
    losses = [line["train_loss"] for line in sft_result.of("step")]
    # Measured: about 5.7 at the first step and 3.2 over the last five.
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]

    evals = sft_result.of("eval")
    assert [line["step"] for line in evals] == [20, 40, 60]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(line["eval_accuracy"] is None for line in evals)

    finished = sft_result.of("finished")[0]
    assert finished["steps"] == STEPS
    assert finished["eval_loss"] == evals[-1]["eval_loss"]
    assert finished["train_loss"] == pytest.approx(sum(losses[-10:]) / 10)


def test_checkpoints_are_written_every_n_steps(sft_result):
    checkpoints = sft_result.of("checkpoint")
    assert [line["step"] for line in checkpoints] == [30, 60]
    for line in checkpoints:
        directory = sft_result.outdir / line["path"]
        assert sorted(p.name for p in directory.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "trainable_parameters.safetensors",
            "trainer_state.json",
            "training_state.json",
            "training_state.safetensors",
        ]
        state = json.loads((directory / "trainer_state.json").read_text())
        assert state["step"] == line["step"]


def test_adapter_is_saved_in_the_peft_layout(sft_result):
    assert sft_result.of("artifact") == [{"event": "artifact", "kind": "adapter", "path": "adapter"}]
    adapter = sft_result.outdir / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 16 and config["lora_alpha"] == 32
    all_linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == all_linear
    assert config["base_model_name_or_path"] == "test-model"


def test_reloaded_adapter_gives_the_trained_models_logits(tiny_llama_path, instruction_set, make_run, tmp_path):
    run = make_run(
        tiny_llama_path, instruction_set, "prompt_completion", max_steps=5, batch_size=8, learning_rate=5e-3,
        max_seq_length=64, eval_fraction=0.1,
    )
    with open(tmp_path / "progress.jsonl", "w") as progress_stream:
        trained = train(run, tmp_path, Progress(progress_stream))
    data = load_training_data(run, load_tokenizer(tiny_llama_path))
    batch = next(iter(make_loader(data.eval, batch_size=8, pad_token_id=data.pad_token_id)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
        untrained = base(**inputs).logits
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")(**inputs).logits

    assert not torch.allclose(untrained, expected, atol=1e-3), "training did not change the model"
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=0)
