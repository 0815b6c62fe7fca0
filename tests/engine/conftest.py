"""Fixtures for the training engine tests: the shipped MiniLM, demo data, and a way to run the
engine exactly as the worker does, as `python -m workers.training`. The tiny random Llama
(`tiny_llama_path`) comes from tests/conftest.py.

None of this needs Django or a database.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.demo_data import write_classification_set, write_instruction_set
from jobs.spec import Hyperparameters, JobSpec, LoraConfig, TrainingRun
from workers.training.tiny_model import minilm_path

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_environment():
    """The environment of an engine child process in these tests.

    One CPU thread: on a small shared machine torch's default of one thread per
    core makes its threads wait on each other whenever another process is busy
    (measured here: 60 steps in 9 s with one thread, 200 s with two under load).
    """
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The same for the engine code these tests run in the pytest process itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm():
    return minilm_path()


@pytest.fixture(scope="session")
def instruction_set(tmp_path_factory):
    return write_instruction_set(tmp_path_factory.mktemp("data") / "instructions.jsonl")


@pytest.fixture(scope="session")
def classification_set(tmp_path_factory):
    return write_classification_set(tmp_path_factory.mktemp("data") / "reviews.csv")


def _make_run(model_path, dataset_path, dataset_format, task="causal_lm_sft", method=None, **hyperparameters):
    return TrainingRun(
        spec=JobSpec(
            base_model="test-model",
            dataset=1,
            task=task,
            method=method or LoraConfig(),
            hyperparameters=Hyperparameters(**hyperparameters),
        ),
        model_path=str(model_path),
        dataset_path=str(dataset_path),
        dataset_format=dataset_format,
    )


class EngineResult:
    def __init__(self, completed, outdir):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.outdir = outdir
        self.events = [_parse_progress_line(line) for line in completed.stdout.splitlines()]

    def of(self, event):
        return [line for line in self.events if line["event"] == event]


def _parse_progress_line(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise AssertionError(f"stdout carries a line that is not JSON: {line!r}") from None


def _run_engine(run, workdir, timeout=300):
    """Run `python -m workers.training SPEC.json OUTDIR` in a child process, as the worker does."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, outdir = workdir / "spec.json", workdir / "out"
    spec_path.write_text(run.model_dump_json() if isinstance(run, TrainingRun) else json.dumps(run))
    completed = subprocess.run(
        [sys.executable, "-m", "workers.training", str(spec_path), str(outdir)],
        cwd=REPO_ROOT,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return EngineResult(completed, outdir)


@pytest.fixture(scope="session")
def make_run():
    """make_run(model_path, dataset_path, dataset_format, task=..., method=..., **hyperparameters) -> TrainingRun"""
    return _make_run


@pytest.fixture(scope="session")
def engine_environment():
    return child_environment()


@pytest.fixture(scope="session")
def run_engine():
    """run_engine(run or spec dict, workdir) -> EngineResult, from a real `python -m workers.training` child."""
    return _run_engine
