"""LoRA's dropout and down-projection in one Triton kernel (workers/training/lora_dropout.py).

On the CPU the kernels run in Triton's interpreter, in a process of their own (TRITON_INTERPRET is
read when the kernels are defined); on a GPU (`-m gpu`) compiled, in CUDA graphs and in the engine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

from jobs.spec import LoraConfig
from tests.engine.test_engine_gpu_fast_path import engine_run, lora_run, losses
from workers.training import speed

ROOT = Path(__file__).resolve().parents[2]


def against_reference(device, dtype):
    """The kernel's output and gradients beside torch's dropout-then-matmul-then-scaling with the kernel's own mask.

    Rows that are no multiple of the blocks and a rank no power of two, as a user's settings may be.
    """
    from workers.training import lora_dropout

    generator = torch.Generator(device).manual_seed(0)
    rows, columns, rank, p, scaling = 70, 512, 12, 0.25, 1.5
    x = torch.randn(1, rows, columns, device=device, generator=generator).to(dtype).requires_grad_()
    a = (0.05 * torch.randn(rank, columns, device=device, generator=generator)).to(dtype).requires_grad_()
    seed = torch.tensor([1234], device=device)
    h = lora_dropout.dropout_down(x, a, seed, p, scaling)
    grad_h = torch.randn(h.shape, device=device, generator=generator).to(dtype)
    h.backward(grad_h)

    kept = lora_dropout.mask(seed, rows, columns, p)
    x_float, a_float = x.detach().float().requires_grad_(), a.detach().float().requires_grad_()
    h_expected = (x_float[0] * kept / (1 - p)) @ a_float.t() * scaling
    h_expected.backward(grad_h[0].float())

    def largest_relative_difference(found, expected):
        return ((found.float() - expected).abs().max() / expected.abs().max()).item()

    return {
        "kept share": kept.float().mean().item(),
        "same seed, same mask": bool((lora_dropout.mask(seed, rows, columns, p) == kept).all()),
        "another seed's mask differs at": (lora_dropout.mask(seed + 1, rows, columns, p) != kept).float().mean().item(),
        "kept with the next column": (kept[:, 1:] & kept[:, :-1]).float().mean().item(),
        "kept with the next row": (kept[1:] & kept[:-1]).float().mean().item(),
        "h": largest_relative_difference(h[0], h_expected),
        "x's gradient": largest_relative_difference(x.grad, x_float.grad),
        "A's gradient": largest_relative_difference(a.grad, a_float.grad),
    }


def check(found, tolerance):
    p = 0.25
    assert found["kept share"] == pytest.approx(1 - p, abs=0.015), found
    assert found["same seed, same mask"], found
    # Two independent masks disagree where one keeps and the other drops: 2p(1-p) of the entries.
    assert found["another seed's mask differs at"] == pytest.approx(2 * p * (1 - p), abs=0.02), found
    # Neighbours (eight columns share one Philox draw) are kept independently of each other.
    assert found["kept with the next column"] == pytest.approx((1 - p) ** 2, abs=0.015), found
    assert found["kept with the next row"] == pytest.approx((1 - p) ** 2, abs=0.015), found
    for name in ("h", "x's gradient", "A's gradient"):
        assert found[name] < tolerance, (name, found)


def in_the_interpreter(call):
    """What `call`, an expression over this module's names, returns in a process that runs Triton's interpreter."""
    script = f"import json, torch; from tests.engine import test_lora_dropout as here; print(json.dumps(here.{call}))"
    result = subprocess.run(
        [sys.executable, "-c", script], env=os.environ | {"TRITON_INTERPRET": "1"}, cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_the_kernel_computes_dropout_then_the_down_projection_in_the_interpreter():
    check(in_the_interpreter("against_reference('cpu', torch.float32)"), tolerance=1e-5)


def step_inputs_against_casting():
    """One step's loss and gradients through StepInputs beside the same step casting the weights, after an update.

    On the CPU the step computes in float32, so the copies are float32 ones: what is checked is that the
    step computes with the weights' current values, that each gradient reaches its own weight and that
    each step draws new masks.
    """
    from workers.training import lora_dropout

    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["0", "1"], init_lora_weights=False),
    )
    assert lora_dropout.use_dropout_kernel(model) == 2
    linears = [model.base_model.model[0], model.base_model.model[1]]
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    inputs = lora_dropout.StepInputs(model, torch.float32)
    x = torch.randn(1, 10, 64)

    def step(computed_from):
        loss = model(x).square().mean()
        for parameter in trained:
            parameter.grad = torch.zeros_like(parameter)
        speed.write_gradients(loss, trained, computed_from)
        return loss.item(), [parameter.grad.clone() for parameter in trained]

    def step_casting():  # the same step, the same seeds, the routed linears casting their weights
        copies = [linear.__dict__.pop("half_copies") for linear in linears]
        result = step(trained)
        for linear, linear_copies in zip(linears, copies):
            linear.half_copies = linear_copies
        return result

    inputs.refresh()
    first_seeds = inputs.seeds.tolist()
    with torch.no_grad():  # as an optimizer step would
        for parameter in trained:
            parameter.add_(0.1)
    stale_loss, _ = step(inputs.computed_from(trained))
    updated_loss, _ = step_casting()
    inputs.refresh()
    loss, gradients = step(inputs.computed_from(trained))
    cast_loss, cast_gradients = step_casting()
    return {
        "copies": len(inputs.copies),
        "stand-ins": sum(stand_in is not weight for stand_in, weight in zip(inputs.computed_from(trained), trained)),
        "new seeds": inputs.seeds.tolist() != first_seeds and len(set(first_seeds)) == 2,
        "stale loss differs": stale_loss != updated_loss,
        "loss": abs(loss - cast_loss),
        "largest gradient difference": max((g - c).abs().max().item() for g, c in zip(gradients, cast_gradients)),
        "smallest gradient": min(c.abs().max().item() for c in cast_gradients),
    }


def test_step_inputs_compute_the_step_that_casting_the_weights_computes():
    found = in_the_interpreter("step_inputs_against_casting()")
    # A and B of both linears have copies, and the step's gradients are taken through them.
    assert found["copies"] == found["stand-ins"] == 4, found
    assert found["new seeds"], found  # one for each linear, drawn anew for each step
    # Until refreshed, the copies hold the weights from before the update: the refresh is what makes the step right.
    assert found["stale loss differs"], found
    assert found["loss"] < 1e-6, found
    assert found["smallest gradient"] > 1e-3, found  # every weight has a gradient to compare
    assert found["largest gradient difference"] < 1e-6, found


def shared_inputs_against_separate_linears(model_path):
    """Two steps of a tiny Llama with q/k/v and gate/up sharing their matmuls, beside the same steps with a matmul each.

    The same weights and seeds, so the same masks; an update of the weights (A and B) between the steps, as an
    optimizer step makes, so that the second step shows the refresh reaching the B's inside the shared matrices.
    In float64, so that what differs is only the order of the sums.
    """
    from transformers import AutoModelForCausalLM

    from workers.training import lora_dropout

    def two_steps(share_inputs):
        torch.manual_seed(0)
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64),
            peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False),
        )
        lora_dropout.use_dropout_kernel(model)
        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        inputs = lora_dropout.StepInputs(model, torch.float64, share_inputs=share_inputs)
        ids = torch.randint(4, 200, (1, 24))
        results = []
        for _ in range(2):
            inputs.refresh()
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            for parameter in trained:
                parameter.grad = torch.zeros_like(parameter)
            speed.write_gradients(loss, trained, inputs.computed_from(trained))
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            results.append((loss.item(), [parameter.grad.clone() for parameter in trained], logits))
            with torch.no_grad():
                for parameter in trained:
                    parameter.add_(0.1 * torch.randn_like(parameter))
        return inputs, results

    shared, shared_steps = two_steps(share_inputs=True)
    separate, separate_steps = two_steps(share_inputs=False)
    steps = []
    for (loss, gradients, logits), (separate_loss, separate_gradients, separate_logits) in zip(shared_steps, separate_steps):
        steps.append({
            "loss": abs(loss - separate_loss),
            "largest relative gradient difference": max(
                ((g - s).abs().max() / s.abs().max()).item() for g, s in zip(gradients, separate_gradients)
            ),
            "smallest gradient": min(s.abs().max().item() for s in separate_gradients),
            "evaluation logits": (logits - separate_logits).abs().max().item(),
        })
    return {"shared B's": len(shared.b_blocks), "separate B's": len(separate.b_blocks), "steps": steps}


def test_linears_that_read_the_same_input_share_a_matmul_and_compute_the_same_step(tiny_llama_path):
    found = in_the_interpreter(f"shared_inputs_against_separate_linears({str(tiny_llama_path)!r})")
    layers = json.loads((tiny_llama_path / "config.json").read_text())["num_hidden_layers"]
    assert found["shared B's"] == 5 * layers and found["separate B's"] == 0, found  # q, k, v, gate and up
    for step in found["steps"]:
        assert step["smallest gradient"] > 1e-3, found  # every weight has a gradient to compare
        assert step["loss"] < 1e-12, found
        assert step["largest relative gradient difference"] < 1e-12, found
        # Out of training the bases, now views of the shared matrices, compute as they did.
        assert step["evaluation logits"] < 1e-12, found


@pytest.mark.parametrize(
    "patterns, grouped",
    [
        ({}, {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}),
        ({"rank_pattern": {"k_proj": 4}}, {"gate_proj", "up_proj"}),
        ({"alpha_pattern": {"up_proj": 8}}, {"q_proj", "k_proj", "v_proj"}),
    ],
    ids=["one setting", "k's own rank", "up's own alpha"],
)
def test_only_linears_with_the_same_lora_settings_share_a_matmul(patterns, grouped, tiny_llama_path):
    """One dropout call computes a group's branches with one rank, dropout and scaling; others keep a matmul each."""
    from transformers import AutoModelForCausalLM

    from workers.training import lora_dropout

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", **patterns)
    model = peft.get_peft_model(base, config)
    assert lora_dropout.use_dropout_kernel(model) == 7 * base.config.num_hidden_layers
    inputs = lora_dropout.StepInputs(model, torch.float32)
    assert len(inputs.b_blocks) == len(grouped) * base.config.num_hidden_layers
    shared = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if getattr(module, "shared_input", None)}
    assert shared == grouped


@pytest.mark.parametrize(
    "options, routed_per_layer",
    [({"lora_dropout": 0.05}, 7), ({"lora_dropout": 0.0}, 0), ({"lora_dropout": 0.05, "use_dora": True}, 0)],
    ids=["lora", "no dropout", "dora"],
)
def test_the_kernel_takes_plain_lora_linears_with_a_dropout(options, routed_per_layer, tiny_llama_path):
    from transformers import AutoModelForCausalLM

    from workers.training import lora_dropout

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    # B random, not zero as peft starts it, so that the branches change the output.
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **options)
    model = peft.get_peft_model(base, config).eval()
    inputs = torch.randint(4, 200, (1, 12))
    with torch.no_grad():
        before = model(input_ids=inputs).logits

    assert lora_dropout.use_dropout_kernel(model) == routed_per_layer * base.config.num_hidden_layers
    # Out of training (evaluation, export), the routed linears compute as peft's: the same logits.
    with torch.no_grad():
        assert torch.equal(model(input_ids=inputs).logits, before)


@pytest.mark.gpu
def test_the_kernel_computes_dropout_then_the_down_projection_on_the_gpu():
    check(against_reference("cuda", torch.bfloat16), tolerance=2e-2)


@pytest.mark.gpu
def test_a_compiled_graphed_lora_layer_draws_a_new_mask_at_each_replay():
    from workers.training import lora_dropout

    torch.manual_seed(0)
    # B random, not zero as peft starts it: the output must depend on the mask.
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(256, 256)).cuda().to(torch.bfloat16),
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["0"], init_lora_weights=False),
    )
    speed.trainable_in_float32(model)
    assert lora_dropout.use_dropout_kernel(model) == 1
    model.compile(dynamic=True)
    x = torch.randn(1, 64, 256, device="cuda", dtype=torch.bfloat16)

    def forward_backward(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch["input_ids"]).float().sum()
        loss.backward()
        return loss.detach()

    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    messages = []
    steps = speed.GraphedSteps(forward_backward, trained, messages.append)
    replays = torch.tensor([float(steps({"input_ids": x})) for _ in range(200)])
    assert steps.graphs and not messages, messages  # captured, and the later steps are replays

    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        without_dropout = model(x).float().sum().item()
    # The loss is linear in the mask: each replay draws its own, and their mean is the loss without dropout.
    assert len(set(replays[2:].tolist())) > 190
    spread = replays.std().item()
    assert spread > 0
    assert abs(replays.mean().item() - without_dropout) < 4 * spread / len(replays) ** 0.5 + 1e-2 * abs(without_dropout)


@pytest.mark.gpu
def test_lora_with_dropout_trains_through_the_kernel_as_through_peft(
    tiny_llama_path, instruction_set, make_run, run_engine, tmp_path, monkeypatch
):
    run = lora_run(make_run, tiny_llama_path, instruction_set, method=LoraConfig(r=16, alpha=32, dropout=0.1, target_modules="all_linear"))
    monkeypatch.setenv("TUNEDECK_LORA_KERNEL", "1")
    kernel = engine_run(run_engine, run, tmp_path / "kernel", monkeypatch, graphs=True)
    monkeypatch.setenv("TUNEDECK_LORA_KERNEL", "0")
    plain = engine_run(run_engine, run, tmp_path / "peft", monkeypatch, graphs=True)

    assert any("LoRA dropout kernel in" in line["message"] for line in kernel.of("log"))
    assert not any("LoRA dropout kernel" in line["message"] for line in plain.of("log"))
    # Other masks, so not the same numbers: the same descent, within the noise of dropout.
    assert sum(losses(kernel)[-10:]) / 10 == pytest.approx(sum(losses(plain)[-10:]) / 10, rel=0.05)
    assert losses(kernel)[-1] < losses(kernel)[0] - 0.5
    adapter = kernel.outdir / "adapter"
    assert peft.PeftConfig.from_pretrained(adapter).lora_dropout == 0.1
    assert (adapter / "adapter_model.safetensors").exists()
