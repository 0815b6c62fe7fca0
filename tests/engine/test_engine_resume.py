"""Checkpoints that resume exactly, and pausing with SIGUSR1.

A run resumed from a checkpoint in a fresh train() call must take the very
steps the uninterrupted run took: same losses, learning rates, tokens and
weights. The runs here are 12 steps of 5 per epoch (36 training rows in
batches of 8), so the checkpoints at steps 4 and 8 both lie inside an epoch,
and the rest of the run crosses into the next one.

Checkpoints are offered for download, so they hold safetensors and JSON only:
every checkpoint any test here writes is checked to hold no pickle, and so is
the finished artifact of each method run here.
"""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from jobs.demo_data import write_instruction_set
from jobs.spec import AdapterConfig, FullFineTuningConfig, LoraConfig, QLoraConfig
from workers.training.checkpoint import (
    PARAMETERS_FILE,
    TRAINER_STATE_FILE,
    TRAINING_STATE_FILE,
    TRAINING_TENSORS_FILE,
    read_training_state,
)
from workers.training.loop import train
from workers.training.progress import Progress
from tests.engine.conftest import REPO_ROOT
from tests.engine.safe_files import assert_no_pickles

TOTAL_STEPS = 12
CHECKPOINT_EVERY = 4
STEPS_PER_EPOCH = 5
TOLERANCE = 1e-5
# Dropout above zero, so that restoring the random generators is put to the test.
METHOD_RUNS = {
    "lora": (LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all_linear"), 5e-3),
    "adapter": (AdapterConfig(placement="houlsby", bottleneck_size=16), 5e-3),
    "full": (FullFineTuningConfig(), 1e-3),
    # 4-bit NF4 on the CPU: bitsandbytes must keep one weight layout across evals and saves to resume exactly.
    # (Resuming at step 8, after the eval at step 6 and two saves, is where a drifting base shows.)
    "qlora": (QLoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all_linear"), 5e-3),
}
@pytest.fixture(scope="module")
def small_instruction_set(tmp_path_factory):
    """40 rows: 36 to train on with eval_fraction=0.1, five batches of 8 (the last one of 4) to an epoch."""
    return write_instruction_set(tmp_path_factory.mktemp("data") / "instructions.jsonl", rows=40)


@pytest.fixture(scope="module")
def run_for(tiny_llama_path, small_instruction_set, make_run):
    def run_for(method_name, **changes):
        config, learning_rate = METHOD_RUNS[method_name]
        hyperparameters = dict(
            method=config, max_steps=TOTAL_STEPS, batch_size=8, learning_rate=learning_rate, max_seq_length=64,
            eval_fraction=0.1, eval_every=6, checkpoint_every=CHECKPOINT_EVERY,
        )
        return make_run(tiny_llama_path, small_instruction_set, "prompt_completion", **(hyperparameters | changes))

    return run_for


def train_in_process(run, outdir):
    """train() in this process; returns its progress events."""
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "progress.jsonl", "w") as stream:
        train(run, outdir, Progress(stream))
    return [json.loads(line) for line in (outdir / "progress.jsonl").read_text().splitlines()]


def of(events, kind):
    return [event for event in events if event["event"] == kind]


def step_lines(events):
    return {event["step"]: event for event in of(events, "step")}


@pytest.fixture(scope="module")
def uninterrupted(run_for, tmp_path_factory):
    """method name -> (OUTDIR, events) of the whole 12-step run, trained once per module."""
    finished_runs = {}

    def uninterrupted(method_name):
        if method_name not in finished_runs:
            outdir = tmp_path_factory.mktemp(f"uninterrupted-{method_name}")
            finished_runs[method_name] = outdir, train_in_process(run_for(method_name), outdir)
        return finished_runs[method_name]

    return uninterrupted


@pytest.mark.parametrize(
    "method_name, resume_step", [("lora", 4), ("lora", 8), ("adapter", 8), ("full", 4), ("qlora", 4), ("qlora", 8)]
)
def test_a_resumed_run_takes_the_same_steps_as_the_uninterrupted_one(
    method_name, resume_step, uninterrupted, run_for, tmp_path
):
    assert resume_step % STEPS_PER_EPOCH != 0, "the resume point is meant to lie inside an epoch"
    whole_outdir, whole_events = uninterrupted(method_name)
    checkpoint = whole_outdir / "checkpoints" / f"step-{resume_step:06d}"
    resumed_run = run_for(method_name).model_copy(update={"resume_from": str(checkpoint)})

    events = train_in_process(resumed_run, tmp_path)

    started = of(events, "started")[0]
    assert started["resumed_from_step"] == resume_step
    assert started["total_steps"] == TOTAL_STEPS
    assert of(whole_events, "started")[0]["resumed_from_step"] == 0

    resumed_steps, whole_steps = step_lines(events), step_lines(whole_events)
    assert list(resumed_steps) == list(range(resume_step + 1, TOTAL_STEPS + 1))
    for step, line in resumed_steps.items():
        expected = whole_steps[step]
        assert line["train_loss"] == pytest.approx(expected["train_loss"], abs=TOLERANCE, rel=0), step
        assert line["learning_rate"] == pytest.approx(expected["learning_rate"], abs=1e-12, rel=0), step
        assert (line["tokens_seen"], line["epoch"]) == (expected["tokens_seen"], expected["epoch"]), step
    resumed_evals = {line["step"]: line["eval_loss"] for line in of(events, "eval")}
    whole_evals = {line["step"]: line["eval_loss"] for line in of(whole_events, "eval") if line["step"] > resume_step}
    assert resumed_evals.keys() == whole_evals.keys()
    assert list(resumed_evals.values()) == pytest.approx(list(whole_evals.values()), abs=TOLERANCE, rel=0)

    # The final train loss is the mean over the last ten steps, some of them taken before the checkpoint.
    finished, whole_finished = of(events, "finished")[0], of(whole_events, "finished")[0]
    assert finished["steps"] == TOTAL_STEPS
    assert finished["train_loss"] == pytest.approx(whole_finished["train_loss"], abs=TOLERANCE, rel=0)
    assert finished["tokens_per_sec"] > 0 and finished["wall_time_s"] > 0

    last = f"checkpoints/step-{TOTAL_STEPS:06d}"
    resumed_weights = load_file(tmp_path / last / PARAMETERS_FILE)
    whole_weights = load_file(whole_outdir / last / PARAMETERS_FILE)
    assert resumed_weights.keys() == whole_weights.keys()
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=TOLERANCE, rtol=0, msg=name)
    assert_no_pickles(whole_outdir / "checkpoints")
    assert_no_pickles(tmp_path / "checkpoints")


@pytest.mark.parametrize("method_name", list(METHOD_RUNS))
def test_the_finished_artifact_holds_no_pickle_either(method_name, uninterrupted):
    outdir, events = uninterrupted(method_name)
    artifacts = of(events, "artifact")
    assert artifacts
    for artifact in artifacts:
        assert_no_pickles(outdir / artifact["path"])


def test_a_checkpoint_holds_the_artifact_the_weights_and_the_training_state(uninterrupted):
    outdir, events = uninterrupted("lora")
    assert [line["step"] for line in of(events, "checkpoint")] == [4, 8, 12]
    directory = outdir / "checkpoints" / "step-000008"
    assert sorted(path.name for path in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainable_parameters.safetensors",
        "trainer_state.json",
        "training_state.json",
        "training_state.safetensors",
    ]
    assert (PARAMETERS_FILE, TRAINER_STATE_FILE, TRAINING_STATE_FILE, TRAINING_TENSORS_FILE) == (
        "trainable_parameters.safetensors", "trainer_state.json", "training_state.json", "training_state.safetensors",
    )
    assert_no_pickles(outdir / "checkpoints")
    assert json.loads((directory / TRAINER_STATE_FILE).read_text()) == {"step": 8, "epoch": 8 / STEPS_PER_EPOCH}
    # Only the LoRA matrices train, and the artifact holds the same ones.
    weights = load_file(directory / PARAMETERS_FILE)
    assert weights and all(".lora_A." in name or ".lora_B." in name for name in weights)
    state = json.loads((directory / TRAINING_STATE_FILE).read_text())
    assert (state["step"], state["steps_per_epoch"]) == (8, STEPS_PER_EPOCH)
    assert state["recent_losses"] == [line["train_loss"] for line in of(events, "step")][:8]
    assert state["tokens_seen"] == step_lines(events)[8]["tokens_seen"]
    assert {"optimizer", "scheduler", "rng"} <= state.keys()
    # AdamW's moments of every LoRA matrix, and the random generators' states, are the tensors beside it.
    tensors = load_file(directory / TRAINING_TENSORS_FILE)
    moments = {
        f"optimizer.state.{index}.{name}" for index in range(len(weights)) for name in ("step", "exp_avg", "exp_avg_sq")
    }
    assert tensors.keys() == moments | {f"rng.{name}" for name in state["rng"]}
    assert "cpu" in state["rng"] and all(tensors[f"rng.{name}"].dtype == torch.uint8 for name in state["rng"])
    # Read back as optimizer.load_state_dict takes it: integer indices, betas a tuple.
    optimizer = read_training_state(directory)["optimizer"]
    assert list(optimizer["state"]) == list(range(len(weights)))
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": LoraConfig(r=4, alpha=16, dropout=0.1, target_modules="all_linear")}, "wrong shape"),
        ({"method": AdapterConfig(placement="houlsby", bottleneck_size=16)}, "missing"),
        ({"batch_size": 4}, "steps per epoch"),
    ],
    ids=["another LoRA rank", "another method", "another batch size"],
)
def test_resuming_from_a_checkpoint_of_another_config_is_refused(changes, message, uninterrupted, run_for, tmp_path):
    outdir, _ = uninterrupted("lora")
    checkpoint = outdir / "checkpoints" / "step-000004"
    run = run_for("lora", **changes).model_copy(update={"resume_from": str(checkpoint)})

    with pytest.raises(ValueError, match="cannot resume from") as refused:
        train_in_process(run, tmp_path)

    assert message in str(refused.value)
    assert str(checkpoint) in str(refused.value)
    assert not (tmp_path / "checkpoints").exists()


# --- pausing a real `python -m workers.training` child with SIGUSR1, then resuming it ---

PAUSE_RUN_STEPS = 40


def start_engine(run, workdir, engine_environment):
    """`python -m workers.training SPEC.json OUTDIR` as the worker starts it, its progress lines on a pipe."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(run.model_dump_json())
    with open(workdir / "stderr.log", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.training", str(spec_path), str(workdir / "out")],
            cwd=REPO_ROOT,
            env=engine_environment,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def signal_after_step(process, step, signum):
    """Read progress lines until `step` is reported, send `signum`, then read to the end; returns every line."""
    events = []
    for line in process.stdout:
        event = json.loads(line)
        events.append(event)
        if event["event"] == "step" and event["step"] == step:
            process.send_signal(signum)
    process.wait(timeout=120)
    return events


@pytest.fixture
def pause_run(run_for):
    # No regular checkpoints: the one in OUTDIR is the pause's.
    return run_for("lora", max_steps=PAUSE_RUN_STEPS, checkpoint_every=1000, eval_every=None)


def test_sigusr1_pauses_after_the_step_with_a_checkpoint_and_resuming_finishes_the_job(
    pause_run, engine_environment, run_engine, tmp_path
):
    paused = start_engine(pause_run, tmp_path, engine_environment)
    events = signal_after_step(paused, 3, signal.SIGUSR1)

    assert paused.returncode == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    pause = events[-1]
    assert pause["event"] == "paused" and 3 <= pause["step"] < PAUSE_RUN_STEPS
    paused_at = pause["step"]
    assert pause["path"] == f"checkpoints/step-{paused_at:06d}"
    assert of(events, "checkpoint") == [{"event": "checkpoint", "step": paused_at, "path": pause["path"]}]
    assert [line["step"] for line in of(events, "step")] == list(range(1, paused_at + 1))
    assert not of(events, "finished") and not of(events, "artifact")
    outdir = tmp_path / "out"
    assert (outdir / pause["path"] / TRAINING_STATE_FILE).is_file()
    assert (outdir / pause["path"] / TRAINING_TENSORS_FILE).is_file()
    assert_no_pickles(outdir / "checkpoints")
    assert not (outdir / "adapter").exists()

    # As a worker would: the same OUTDIR, the spec now pointing at the pause's checkpoint.
    resumed_run = pause_run.model_copy(update={"resume_from": str(outdir / pause["path"])})
    resumed = run_engine(resumed_run, tmp_path)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.of("started")[0]["resumed_from_step"] == paused_at
    assert [line["step"] for line in resumed.of("step")] == list(range(paused_at + 1, PAUSE_RUN_STEPS + 1))
    assert resumed.of("finished")[0]["steps"] == PAUSE_RUN_STEPS
    assert (outdir / "adapter" / "adapter_model.safetensors").is_file()
    recorded = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in of(recorded, "step")] == list(range(1, PAUSE_RUN_STEPS + 1))


def test_sigterm_still_cancels_at_once(pause_run, engine_environment, tmp_path):
    cancelled = start_engine(pause_run, tmp_path, engine_environment)
    events = signal_after_step(cancelled, 3, signal.SIGTERM)

    assert cancelled.returncode == -signal.SIGTERM
    assert not of(events, "paused") and not of(events, "checkpoint") and not of(events, "finished")
    assert not (tmp_path / "out" / "checkpoints").exists()
