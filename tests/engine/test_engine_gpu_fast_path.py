"""The GPU's fast path: attention within packed sequences (varlen flash attention, FlexAttention) and
CUDA graphs of the step, in one process and in two (speed.py).

GPU only, so CI (CPU) deselects them; on a GPU machine:
`python -m pytest tests/engine/test_engine_gpu_fast_path.py -m gpu` (the two-process test needs two GPUs).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.spec import FullFineTuningConfig, LoraConfig
from tests.engine.test_engine_packing import PAD, examples, packed
from tests.engine.test_engine_processes import run_in_processes
from workers.training import speed
from workers.training.data import collate_packed, real_tokens

pytestmark = pytest.mark.gpu

STEPS = 40


def lora_run(make_run, tiny_llama_path, instruction_set, **changes):
    # No dropout: with the same seed, the graphed and the eager run then compute the same numbers.
    settings = dict(
        method=LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all_linear"),
        max_steps=STEPS,
        batch_size=8,
        learning_rate=5e-3,
        max_seq_length=128,
        eval_fraction=0,
        checkpoint_every=1000,
    ) | changes
    return make_run(tiny_llama_path, instruction_set, "prompt_completion", **settings)


def engine_run(run_engine, run, workdir, monkeypatch, graphs, attention="varlen", compiled=True):
    monkeypatch.setenv("TUNEDECK_CUDA_GRAPHS", "1" if graphs else "0")
    monkeypatch.setenv("TUNEDECK_ATTENTION", attention)
    # Compiling takes most of a short run's minute; the tests of what is not the compiler's leave it out.
    monkeypatch.setenv("TUNEDECK_COMPILE", "default" if compiled else "0")
    result = run_engine(run, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(result):
    return [line["train_loss"] for line in result.of("step")]


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


def test_held_out_rows_are_evaluated_alike_with_each_attention(
    tiny_llama_path, instruction_set, make_run, run_engine, tmp_path, monkeypatch
):
    # Training rows are packed; held-out rows come in padded batches, which fall back to SDPA's kernel.
    run = lora_run(make_run, tiny_llama_path, instruction_set, eval_fraction=0.2, eval_every=20)
    results = {
        attention: engine_run(
            run_engine, run, tmp_path / attention, monkeypatch, graphs=True, attention=attention, compiled=False
        )
        for attention in ("varlen", "flex", "sdpa")
    }
    assert any("varlen flash attention" in line["message"] for line in results["varlen"].of("log"))
    assert any("FlexAttention" in line["message"] for line in results["flex"].of("log"))
    eval_losses = {attention: [line["eval_loss"] for line in result.of("eval")] for attention, result in results.items()}
    assert len(eval_losses["sdpa"]) == 2 and eval_losses["sdpa"][-1] < eval_losses["sdpa"][0]
    for attention in ("varlen", "flex"):
        assert losses(results[attention]) == pytest.approx(losses(results["sdpa"]), rel=2e-2, abs=2e-2), attention
        assert eval_losses[attention] == pytest.approx(eval_losses["sdpa"], rel=2e-2, abs=2e-2), attention


def test_full_fine_tuning_trains_with_varlen_attention_as_with_sdpa(
    tiny_llama_path, instruction_set, make_run, run_engine, tmp_path, monkeypatch
):
    # float32 weights under bf16 autocast: the attention's inputs come in float32 from the rotary embeddings.
    run = lora_run(make_run, tiny_llama_path, instruction_set, method=FullFineTuningConfig(), learning_rate=1e-3)
    varlen, sdpa = (
        engine_run(run_engine, run, tmp_path / attention, monkeypatch, graphs=True, attention=attention, compiled=False)
        for attention in ("varlen", "sdpa")
    )
    assert any("varlen flash attention" in line["message"] for line in varlen.of("log"))
    assert losses(varlen) == pytest.approx(losses(sdpa), rel=2e-2, abs=2e-2)
    assert losses(varlen)[-1] < losses(varlen)[0] - 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two processes need two GPUs")
def test_graphed_steps_in_two_processes_train_as_ddp_does(
    tiny_llama_path, instruction_set, make_run, tmp_path, monkeypatch
):
    run = lora_run(make_run, tiny_llama_path, instruction_set, max_steps=20, eval_fraction=0.1, eval_every=10)
    monkeypatch.setenv("TUNEDECK_COMPILE", "0")
    results = {}
    for graphs in (True, False):
        monkeypatch.setenv("TUNEDECK_CUDA_GRAPHS", "1" if graphs else "0")
        results[graphs] = run_in_processes(run, tmp_path / f"graphs-{graphs}")
        assert results[graphs].returncode == 0, results[graphs].stderr[-4000:]
    graphed, ddp = results[True], results[False]
    messages = [line["message"] for line in graphed.of("log")]
    assert any("CUDA graphs" in message for message in messages), messages
    assert not any("could not be captured" in message for message in messages), messages
    assert [line["gpus"] for line in graphed.of("started")] == [2]
    # Both processes' rows counted, the gradients averaged over both: DDP's numbers, step by step.
    assert [line["tokens_seen"] for line in graphed.of("step")] == [line["tokens_seen"] for line in ddp.of("step")]
    assert losses(graphed) == pytest.approx(losses(ddp), rel=2e-2, abs=2e-2)
    assert losses(graphed)[-1] < losses(graphed)[0] - 0.5
    assert [line["eval_loss"] for line in graphed.of("eval")] == pytest.approx(
        [line["eval_loss"] for line in ddp.of("eval")], rel=2e-2, abs=2e-2
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two processes need two GPUs")
def test_sharded_processes_on_gpus_train_as_ddp_does(tiny_llama_path, instruction_set, make_run, tmp_path, monkeypatch):
    """FSDP on GPUs: compiled blocks, weights gathered in bf16, gradients reduced in float32 (sharding.py)."""
    run = lora_run(make_run, tiny_llama_path, instruction_set, max_steps=20, eval_fraction=0.1, eval_every=10,
                   checkpoint_every=10)
    monkeypatch.setenv("TUNEDECK_CUDA_GRAPHS", "0")
    monkeypatch.setenv("TUNEDECK_COMPILE", "default")  # compiled, though 20 steps would not repay it
    sharded = run_in_processes(run.model_copy(update={"shard_weights": True}), tmp_path / "fsdp")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    ddp = run_in_processes(run, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    messages = " ".join(line["message"] for line in sharded.of("log"))
    assert "sharded over 2 processes (FSDP)" in messages and ", compiled" in messages
    assert [line["tokens_seen"] for line in sharded.of("step")] == [line["tokens_seen"] for line in ddp.of("step")]
    assert losses(sharded) == pytest.approx(losses(ddp), rel=2e-2, abs=2e-2)
    assert losses(sharded)[-1] < losses(sharded)[0] - 0.5
    assert [line["eval_loss"] for line in sharded.of("eval")] == pytest.approx(
        [line["eval_loss"] for line in ddp.of("eval")], rel=2e-2, abs=2e-2
    )
    assert [line["step"] for line in sharded.of("checkpoint")] == [10, 20]
    assert (sharded.outdir / "adapter" / "adapter_model.safetensors").exists()


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
    assert set(steps.graphs) == {((1, 4),), ((2, 4),)}  # one graph per shape of the inputs


# Flash attention computes in half precision only, so varlen is checked in bf16 (as the engine trains on a
# GPU), to bf16's tolerance; FlexAttention in float32, to float32's.
@pytest.mark.parametrize(
    "attention, dtype, tolerance", [("varlen", torch.bfloat16, 2e-2), ("flex", torch.float32, 1e-3)]
)
def test_packed_sequences_attend_within_themselves_as_with_sdpa(tiny_llama_path, attention, dtype, tolerance, monkeypatch):
    monkeypatch.setenv("TUNEDECK_ATTENTION", attention)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=dtype).cuda().eval()
    first, second = examples([12, 20])
    changed_first = examples([12], seed=99)[0]

    def logits(rows):
        return model(**{name: value.cuda() if torch.is_tensor(value) else value for name, value in packed(rows).items()}).logits.float()

    with torch.no_grad():
        sdpa_logits = logits([first, second])
        name = speed.attend_within_sequences(model)
        assert name == {"varlen": "varlen flash attention", "flex": "FlexAttention"}[attention]
        assert model.config._attn_implementation == {"varlen": speed.VARLEN, "flex": "flex_attention"}[attention]
        fast_logits = logits([first, second])
        after_a_changed_neighbour = logits([changed_first, second])
        alone = logits([second])
    torch.testing.assert_close(fast_logits, sdpa_logits, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(fast_logits[0, :12], after_a_changed_neighbour[0, :12], rtol=tolerance, atol=tolerance)
    # In float32 a neighbour changes nothing at all; bf16 leaves room for its rounding.
    neighbour_tolerance = {"rtol": tolerance, "atol": tolerance} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(fast_logits[0, 12:32], after_a_changed_neighbour[0, 12:32], **neighbour_tolerance)
    torch.testing.assert_close(fast_logits[0, 12:32], alone[0, :20], rtol=tolerance, atol=tolerance)


def test_flash_attention_bounded_by_max_seq_length_computes_what_it_did_bounded_by_the_row(tiny_llama_path, monkeypatch):
    monkeypatch.setenv("TUNEDECK_ATTENTION", "varlen")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.bfloat16).cuda()
    assert speed.attend_within_sequences(model) == "varlen flash attention"
    rows = examples([100, 300, 200])  # 600 real tokens: a row of 768, its pad 168 long

    def logits_and_gradients(max_seq_length):
        batch = collate_packed(rows, PAD, batch_size=3, max_seq_length=max_seq_length)
        real_tokens(batch)
        model.zero_grad(set_to_none=True)
        output = model(**{name: value.cuda() if torch.is_tensor(value) else value for name, value in batch.items()})
        output.loss.backward()
        gradients = {name: p.grad.float() for name, p in model.named_parameters() if "self_attn" in name}
        return batch.get("max_length_q"), output.logits.float(), gradients

    row_bound, row_logits, row_gradients = logits_and_gradients(None)
    bound, bounded_logits, bounded_gradients = logits_and_gradients(300)
    assert (row_bound, bound) == (None, 300)
    torch.testing.assert_close(bounded_logits, row_logits, rtol=0, atol=0)
    for name, gradient in row_gradients.items():
        torch.testing.assert_close(bounded_gradients[name], gradient, rtol=1e-3, atol=1e-5, msg=name)


def test_a_job_too_short_to_repay_compiling_trains_eagerly_and_says_so(
    tiny_llama_path, instruction_set, make_run, run_engine, tmp_path, monkeypatch
):
    monkeypatch.delenv("TUNEDECK_COMPILE", raising=False)  # the default: compile where it pays
    result = run_engine(lora_run(make_run, tiny_llama_path, instruction_set), tmp_path / "short")
    assert result.returncode == 0, result.stderr[-3000:]
    messages = " ".join(line["message"] for line in result.of("log"))
    assert f"not compiled: {STEPS} steps would not repay compiling" in messages, messages
    assert "CUDA graphs" in messages
    assert losses(result)[-1] < losses(result)[0] - 0.5
