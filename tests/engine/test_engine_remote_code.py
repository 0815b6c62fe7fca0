"""A base model's own Python code runs only when the run trusts it (an admin's choice per base model).

The model here is the tiny Llama under a model type transformers does not know, whose config's
auto_map points at a Python file beside the weights, as on the hub. That file leaves a mark when it
runs, so the test sees whether it ran, not only whether the load failed.
"""

import json
import shutil

import pytest

CUSTOM_CODE = '''
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({mark!r}).touch()  # this file ran


class CustomLlamaConfig(LlamaConfig):
    model_type = "tunedeck-custom-llama"


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig
'''


@pytest.fixture
def model_with_its_own_code(tiny_llama_path, tmp_path, monkeypatch):
    model = shutil.copytree(tiny_llama_path, tmp_path / "custom-llama")
    mark = tmp_path / "custom-code-ran"
    (model / "custom_llama.py").write_text(CUSTOM_CODE.format(mark=str(mark)))
    config = json.loads((model / "config.json").read_text())
    config |= {
        "model_type": "tunedeck-custom-llama",
        "architectures": ["CustomLlamaForCausalLM"],
        "auto_map": {"AutoConfig": "custom_llama.CustomLlamaConfig",
                     "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM"},
    }
    (model / "config.json").write_text(json.dumps(config))
    # transformers copies trusted code into its modules cache before importing it: this test's own.
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return model, mark


def test_a_models_own_code_does_not_run_unless_trusted(model_with_its_own_code, instruction_set, make_run, run_engine,
                                                        tmp_path):
    model, mark = model_with_its_own_code
    result = run_engine(make_run(model, instruction_set, "prompt_completion", max_steps=2), tmp_path / "untrusted")

    assert result.returncode == 1
    message = result.events[-1]["message"]
    assert result.events[-1]["event"] == "error"
    assert f"the model at {model} ships its own Python code (auto_map in its config)" in message
    assert "only for a base model whose trust_remote_code an admin has enabled" in message
    assert not mark.exists()


def test_a_trusted_models_own_code_runs(model_with_its_own_code, instruction_set, make_run, run_engine, tmp_path):
    model, mark = model_with_its_own_code
    run = make_run(model, instruction_set, "prompt_completion", max_steps=2, eval_fraction=0)
    run.trust_remote_code = True
    result = run_engine(run, tmp_path / "trusted")

    assert result.returncode == 0, result.stderr[-3000:]
    assert mark.exists()
    assert result.of("finished")
