"""The engine as several processes (DDP), as a multi-GPU job runs it, here on the CPU with gloo.

The worker starts a job that asks for N GPUs under `accelerate launch`; torchrun sets the same
variables (RANK, WORLD_SIZE, MASTER_ADDR...) that accelerate reads, and needs no GPU.
"""

import subprocess
import sys

import pytest

from jobs.spec import LoraConfig
from workers.training.data import load_training_data, make_loader, real_tokens
from workers.training.modeling import load_tokenizer

from tests.engine.conftest import REPO_ROOT, EngineResult, child_environment

PROCESSES = 2
STEPS = 6
BATCH_SIZE = 4


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
def lora_run(tiny_llama_path, instruction_set, make_run):
    return make_run(
        tiny_llama_path, instruction_set, "prompt_completion",
        method=LoraConfig(r=8, alpha=16, target_modules="all_linear"),
        max_steps=STEPS, batch_size=BATCH_SIZE, learning_rate=5e-3, max_seq_length=64, eval_fraction=0.1,
        checkpoint_every=3,
    )


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
