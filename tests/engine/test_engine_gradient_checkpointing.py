"""Gradient checkpointing: the same training, with less memory held between forward and backward."""

from jobs.spec import LoraConfig


def test_checkpointed_training_takes_the_same_steps(tiny_llama_path, instruction_set, make_run, run_engine, tmp_path):
    def losses(gradient_checkpointing):
        run = make_run(
            tiny_llama_path, instruction_set, "prompt_completion",
            method=LoraConfig(r=8, dropout=0.0, target_modules="all_linear"),
            max_steps=4, batch_size=8, learning_rate=1e-2, max_seq_length=64, eval_fraction=0,
            gradient_checkpointing=gradient_checkpointing,
        )
        result = run_engine(run, tmp_path / str(gradient_checkpointing))
        assert result.returncode == 0, result.stderr[-3000:]
        return [line["train_loss"] for line in result.of("step")]

    plain, checkpointed = losses(False), losses(True)
    assert len(plain) == 4
    assert max(abs(a - b) for a, b in zip(plain, checkpointed)) < 1e-5
