"""The engine as several processes (DDP), as a multi-GPU job runs it, here on the CPU with gloo.

The worker starts a job that asks for N GPUs under `accelerate launch`; torchrun sets the same
variables (RANK, WORLD_SIZE, MASTER_ADDR...) that accelerate reads, and needs no GPU.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from jobs.spec import FullFineTuningConfig, LoraConfig
from workers.training.data import load_training_data, make_loader, real_tokens
from workers.training.modeling import load_tokenizer

from tests.engine.conftest import REPO_ROOT, EngineResult, child_environment

PROCESSES = 2
STEPS = 6
BATCH_SIZE = 4
PROVERBS = ["All that glitters is not gold.", "Actions speak louder than words.", "Where there is smoke there is fire."]


def run_in_processes(run, workdir, before=None):
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, outdir = workdir / "spec.json", workdir / "out"
    spec_path.write_text(run.model_dump_json())
    if before:
        before(outdir)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
         "-m", "workers.training", str(spec_path), str(outdir)],
        cwd=REPO_ROOT, env=child_environment(), capture_output=True, text=True, timeout=300,
    )
    return EngineResult(completed, outdir)


@pytest.fixture(scope="module")
def lora_run(tiny_llama_path, instruction_set, make_run, tmp_path_factory):
    run = make_run(
        tiny_llama_path, instruction_set, "prompt_completion",
        method=LoraConfig(r=8, alpha=16, target_modules="all_linear"),
        max_steps=STEPS, batch_size=BATCH_SIZE, learning_rate=5e-3, max_seq_length=64, eval_fraction=0.1,
        checkpoint_every=3,
    )
    # The forgetting check's set, for the sharded run to measure against this one.
    reference_set = tmp_path_factory.mktemp("reference") / "proverbs.jsonl"
    reference_set.write_text("".join(json.dumps({"text": text}) + "\n" for text in PROVERBS))
    run.reference_dataset_path, run.reference_dataset_format = str(reference_set), "text"
    return run


@pytest.fixture(scope="module")
def two_processes(lora_run, tmp_path_factory):
    result = run_in_processes(lora_run, tmp_path_factory.mktemp("ddp"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_the_first_process_alone_reports_each_step_once(two_processes):
    assert [line["event"] for line in two_processes.events][:1] == ["started"]
    assert [line["step"] for line in two_processes.of("step")] == list(range(1, STEPS + 1))
    assert len(two_processes.of("finished")) == 1
    assert [line["step"] for line in two_processes.of("checkpoint")] == [3, 6]
    assert (two_processes.outdir / "adapter" / "adapter_model.safetensors").exists()


def test_each_step_counts_the_real_tokens_of_both_processes_batches(two_processes, lora_run, tiny_llama_path):
    """Each process trains on its own batches (accelerate deals them out in turns): a step counts both."""
    data = load_training_data(lora_run, load_tokenizer(tiny_llama_path))
    loader = make_loader(data.train, BATCH_SIZE, data.pad_token_id, shuffle=True, seed=lora_run.spec.hyperparameters.seed,
                         pack=True)
    batches = [int(real_tokens(batch)) for batch in loader]
    expected = [sum(batches[PROCESSES * step:PROCESSES * (step + 1)]) for step in range(STEPS)]
    steps = two_processes.of("step")
    assert [line["tokens_seen"] for line in steps] == [sum(expected[: step + 1]) for step in range(STEPS)]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]


def test_a_pause_file_stops_every_process_at_the_same_step(lora_run, tmp_path):
    def ask_for_a_pause(outdir):
        outdir.mkdir(parents=True)
        (outdir / "PAUSE").touch()

    result = run_in_processes(lora_run, tmp_path / "paused", before=ask_for_a_pause)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line["event"] for line in result.events if line["event"] in ("step", "checkpoint", "paused", "finished")] == [
        "step", "checkpoint", "paused",
    ]
    assert result.of("paused")[0]["step"] == 1
    assert not (result.outdir / "adapter").exists()


# --- sharded (FSDP): the same training, with each process holding half of the weights and optimizer state ---

def sharded(run):
    return run.model_copy(update={"shard_weights": True})


@pytest.fixture(scope="module")
def two_sharded_processes(lora_run, tmp_path_factory):
    result = run_in_processes(sharded(lora_run), tmp_path_factory.mktemp("fsdp"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_tensors(found_file, expected_file):
    found, expected = load_file(found_file), load_file(expected_file)
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sharded_processes_train_as_unsharded_ones(two_sharded_processes, two_processes):
    log = " ".join(line["message"] for line in two_sharded_processes.of("log"))
    assert "sharded over 2 processes (FSDP)" in log
    steps, unsharded_steps = two_sharded_processes.of("step"), two_processes.of("step")
    assert [line["tokens_seen"] for line in steps] == [line["tokens_seen"] for line in unsharded_steps]
    assert [line["train_loss"] for line in steps] == pytest.approx([line["train_loss"] for line in unsharded_steps], rel=1e-5)
    finished, unsharded = two_sharded_processes.of("finished")[0], two_processes.of("finished")[0]
    for measurement in ("eval_loss", "reference_loss_before", "reference_loss_after"):
        assert finished[measurement] == pytest.approx(unsharded[measurement], rel=1e-5), measurement
    assert finished["reference_loss_before"] != pytest.approx(finished["reference_loss_after"], rel=1e-3)
    assert_same_tensors(two_sharded_processes.outdir / "adapter" / "adapter_model.safetensors",
                        two_processes.outdir / "adapter" / "adapter_model.safetensors")


def test_a_sharded_checkpoint_holds_what_an_unsharded_one_does(two_sharded_processes, two_processes):
    """The weights and AdamW's moments gathered whole, numbered as optimizer.state_dict() numbers them."""
    checkpoint = two_sharded_processes.outdir / "checkpoints" / "step-000003"
    unsharded = two_processes.outdir / "checkpoints" / "step-000003"
    for name in ("trainable_parameters.safetensors", "training_state.safetensors", "adapter_model.safetensors"):
        if name == "training_state.safetensors":
            # The random generators' states are the first process's in both; only the optimizer's tensors are compared.
            found, expected = load_file(checkpoint / name), load_file(unsharded / name)
            optimizer_keys = sorted(key for key in expected if key.startswith("optimizer."))
            assert sorted(key for key in found if key.startswith("optimizer.")) == optimizer_keys
            assert optimizer_keys
            for key in optimizer_keys:
                torch.testing.assert_close(found[key], expected[key], rtol=1e-4, atol=1e-7, msg=key)
        else:
            assert_same_tensors(checkpoint / name, unsharded / name)
    state, unsharded_state = (json.loads((path / "training_state.json").read_text()) for path in (checkpoint, unsharded))
    assert state["optimizer"]["param_groups"] == unsharded_state["optimizer"]["param_groups"]


def assert_sharded_resume_ends_as(uninterrupted, lora_run, workdir):
    """Resume sharded from `uninterrupted`'s checkpoint at step 3: the same later steps and the same adapter."""
    resumed_run = sharded(lora_run).model_copy(
        update={"resume_from": str(uninterrupted.outdir / "checkpoints" / "step-000003")}
    )
    resumed = run_in_processes(resumed_run, workdir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    steps = uninterrupted.of("step")[3:]
    assert [line["step"] for line in resumed.of("step")] == [line["step"] for line in steps]
    assert [line["train_loss"] for line in resumed.of("step")] == pytest.approx([line["train_loss"] for line in steps], rel=1e-5)
    assert_same_tensors(resumed.outdir / "adapter" / "adapter_model.safetensors",
                        uninterrupted.outdir / "adapter" / "adapter_model.safetensors")


def test_a_sharded_run_resumes_from_its_checkpoint_to_the_same_end(two_sharded_processes, lora_run, tmp_path):
    assert_sharded_resume_ends_as(two_sharded_processes, lora_run, tmp_path / "resumed")


def test_full_fine_tuning_sharded_saves_the_model_unsharded_training_does(tiny_llama_path, instruction_set, make_run, tmp_path):
    run = make_run(
        tiny_llama_path, instruction_set, "prompt_completion", method=FullFineTuningConfig(),
        max_steps=3, batch_size=BATCH_SIZE, learning_rate=1e-4, max_seq_length=64, eval_fraction=0.1,
    )
    unsharded, with_shards = run_in_processes(run, tmp_path / "ddp"), run_in_processes(sharded(run), tmp_path / "fsdp")
    assert unsharded.returncode == 0, unsharded.stderr[-4000:]
    assert with_shards.returncode == 0, with_shards.stderr[-4000:]
    assert [line["train_loss"] for line in with_shards.of("step")] == pytest.approx(
        [line["train_loss"] for line in unsharded.of("step")], rel=1e-5
    )
    assert_same_tensors(with_shards.outdir / "adapter" / "model.safetensors", unsharded.outdir / "adapter" / "model.safetensors")


def test_a_sharded_run_resumes_from_an_unsharded_checkpoint(two_processes, lora_run, tmp_path):
    """The same checkpoint layout either way: a job that moves to smaller GPUs goes on where it stopped."""
    assert_sharded_resume_ends_as(two_processes, lora_run, tmp_path / "resumed")
