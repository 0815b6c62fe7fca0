"""A job that cannot run fails with exit status 1 and an "error" line that says why."""

from jobs.spec import LoraConfig


def test_unknown_target_module_names_the_modules_that_exist(
    tiny_llama_path, instruction_set, make_run, run_engine, tmp_path
):
    run = make_run(
        tiny_llama_path,
        instruction_set,
        "prompt_completion",
        method=LoraConfig(target_modules=["q_proj", "attn_qq"]),
        max_steps=2,
    )
    result = run_engine(run, tmp_path)

    assert result.returncode == 1
    error = result.events[-1]
    assert set(error) == {"event", "message"} and error["event"] == "error"
    assert "attn_qq" in error["message"]
    for existing in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert existing in error["message"]
    assert not (result.outdir / "adapter").exists()


def test_invalid_spec_names_the_field(tiny_llama_path, instruction_set, make_run, run_engine, tmp_path):
    spec = make_run(tiny_llama_path, instruction_set, "prompt_completion").model_dump()
    spec["spec"]["hyperparameters"]["batch_size"] = 0
    result = run_engine(spec, tmp_path)

    assert result.returncode == 1
    assert [line["event"] for line in result.events] == ["error"]
    assert "batch_size" in result.events[0]["message"]


def test_task_and_dataset_kind_must_agree(minilm, instruction_set, make_run, run_engine, tmp_path):
    run = make_run(minilm, instruction_set, "prompt_completion", task="sequence_classification", max_steps=2)
    result = run_engine(run, tmp_path)

    assert result.returncode == 1
    assert result.events[-1]["event"] == "error"
    assert "classification dataset" in result.events[-1]["message"]
