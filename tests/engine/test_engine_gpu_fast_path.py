"""The GPU's fast path: FlexAttention over packed rows and CUDA graphs of the step (speed.py).

GPU only, so CI (CPU) deselects them; on a GPU machine:
`python -m pytest tests/engine/test_engine_gpu_fast_path.py -m gpu`.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.spec import LoraConfig
from tests.engine.test_engine_packing import examples, packed
from workers.training import speed

pytestmark = pytest.mark.gpu

STEPS = 40


def lora_run(make_run, tiny_llama_path, instruction_set):
    # No dropout: with the same seed, the graphed and the eager run then compute the same numbers.
    return make_run(
        tiny_llama_path,
        instruction_set,
        "prompt_completion",
        method=LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all_linear"),
        max_steps=STEPS,
        batch_size=8,
        learning_rate=5e-3,
        max_seq_length=128,
        eval_fraction=0,
        checkpoint_every=1000,
    )


def engine_run(run_engine, run, workdir, monkeypatch, graphs):
    monkeypatch.setenv("TUNEDECK_CUDA_GRAPHS", "1" if graphs else "0")
    result = run_engine(run, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_graphed_steps_train_as_the_eager_steps_do(
    tiny_llama_path, instruction_set, make_run, run_engine, tmp_path, monkeypatch
):
    run = lora_run(make_run, tiny_llama_path, instruction_set)
    graphed = engine_run(run_engine, run, tmp_path / "graphed", monkeypatch, graphs=True)
    eager = engine_run(run_engine, run, tmp_path / "eager", monkeypatch, graphs=False)

    messages = [line["message"] for line in graphed.of("log")]
    assert any("CUDA graphs" in message for message in messages), messages
    assert not any("CUDA graphs" in line["message"] for line in eager.of("log"))
    assert not any("could not be captured" in message for message in messages), messages

    graphed_losses = [line["train_loss"] for line in graphed.of("step")]
    eager_losses = [line["train_loss"] for line in eager.of("step")]
    assert len(graphed_losses) == len(eager_losses) == STEPS
    assert [line["tokens_seen"] for line in graphed.of("step")] == [line["tokens_seen"] for line in eager.of("step")]
    # The same kernels in the same order, replayed: equal up to bf16 rounding, and training goes down alike.
    assert graphed_losses == pytest.approx(eager_losses, rel=2e-2, abs=2e-2)
    assert graphed_losses[-1] < graphed_losses[0] - 0.5
    assert (graphed.outdir / "adapter" / "adapter_model.safetensors").exists()


def test_a_step_that_cannot_be_captured_runs_eagerly_and_says_so():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4, device="cuda"))
    batches = [torch.randn(1, 4, device="cuda") for _ in range(3)]

    def forward_backward(batch):
        loss = (batch["input_ids"] @ weight).square().mean()
        assert loss.item() >= 0  # reads the GPU back, which no graph can hold
        loss.backward()
        return loss.detach()

    messages = []
    steps = speed.GraphedSteps(forward_backward, [weight], messages.append)
    losses = []
    for inputs in batches:
        weight.grad.zero_()
        losses.append(float(steps({"input_ids": inputs})))
        # Each step's gradient is its own batch's, graph or not.
        expected = torch.autograd.grad((inputs @ weight).square().mean(), weight)[0]
        torch.testing.assert_close(weight.grad, expected)

    expected_losses = [float((inputs @ weight).square().mean()) for inputs in batches]
    assert losses == pytest.approx(expected_losses)
    assert len(messages) == 1 and "could not be captured" in messages[0], messages
    assert not steps.graphs


def test_graphs_replay_each_shape_with_its_own_inputs():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4, device="cuda"))

    def forward_backward(batch):
        loss = (batch["input_ids"] @ weight).square().mean()
        loss.backward()
        return loss.detach()

    steps = speed.GraphedSteps(forward_backward, [weight], print)
    shapes = [(1, 4), (2, 4), (1, 4), (2, 4), (1, 4), (2, 4), (1, 4)]  # eager, eager, captured twice, replayed
    for shape in shapes:
        inputs = torch.randn(*shape, device="cuda")
        weight.grad.zero_()
        loss = float(steps({"input_ids": inputs}))
        assert loss == pytest.approx(float((inputs @ weight).square().mean()), rel=1e-5)
        expected = torch.autograd.grad((inputs @ weight).square().mean(), weight)[0]
        torch.testing.assert_close(weight.grad, expected)
    assert set(steps.graphs) == {(1, 4), (2, 4)}


def test_flexattention_keeps_packed_sequences_apart_as_sdpa_does(tiny_llama_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).cuda().eval()
    first, second = examples([12, 20])
    changed_first = examples([12], seed=99)[0]

    def logits(rows):
        return model(**{name: value.cuda() if torch.is_tensor(value) else value for name, value in packed(rows).items()}).logits

    with torch.no_grad():
        sdpa_logits = logits([first, second])
        assert speed.attend_within_sequences(model)
        assert model.config._attn_implementation == "flex_attention"
        flex_logits = logits([first, second])
        after_a_changed_neighbour = logits([changed_first, second])
        alone = logits([second])
    torch.testing.assert_close(flex_logits, sdpa_logits, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(flex_logits[0, :12], after_a_changed_neighbour[0, :12])
    torch.testing.assert_close(flex_logits[0, 12:32], after_a_changed_neighbour[0, 12:32])
    torch.testing.assert_close(flex_logits[0, 12:32], alone[0, :20], rtol=1e-3, atol=1e-3)
