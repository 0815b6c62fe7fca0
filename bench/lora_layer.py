"""What LoRA's branches cost on a GPU: one decoder layer of the Llama-1B shape, forward and backward.

    python bench/lora_layer.py [--tokens 2640] [--out results/lora-layer.json]

The same layer, compiled and replayed as a CUDA graph, at the tokens of one step of issue 7's
benchmark: the frozen bf16 base alone (gradients to the input only, as under any frozen method),
then with peft LoRA (r=16, alpha=32, all seven linears, float32 adapter weights under bf16 autocast,
as the engine trains) at dropout 0.05 and 0, and each of those again with the LoRA linears' forward
replaced by FusedLoraLinear below (a trial, not the engine's): B's product added into the base
matmul's output by cuBLAS (addmm) and, without dropout, A's input gradient added into the base's
the same way. Attention here is SDPA over the whole row (no packing); it is the same in all.
Prints and writes milliseconds per layer (median of 5 runs of 50 replays).
"""

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

CONFIG = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                     num_hidden_layers=1, vocab_size=128256, attn_implementation="sdpa")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + s (dropout(x) A^T) B^T, with the additions done by the matmuls (beta=1), not kernels of their own."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, dropout):
        rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        a, b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
        keep = torch.rand_like(rows) >= dropout if dropout else None
        dropped = rows * keep / (1 - dropout) if dropout else rows
        low_rank = dropped @ a.t()
        out = torch.addmm(rows @ weight.t(), low_rank, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, keep, low_rank, weight, a, b)
        ctx.scaling, ctx.dropout, ctx.dtypes = scaling, dropout, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        dropped, keep, low_rank, weight, a, b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)
        grad_low_rank = (grad @ b) * ctx.scaling
        grad_b = torch.mm(grad.t(), low_rank) * ctx.scaling
        grad_a = grad_low_rank.t() @ dropped
        if ctx.dropout:
            grad_x = grad @ weight + (grad_low_rank @ a) * keep / (1 - ctx.dropout)
        else:
            grad_x = torch.addmm(grad @ weight, grad_low_rank, a)
        grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        return grad_x, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None, None


def fuse_lora_linears(model):
    """Each peft LoRA Linear computes through FusedLoraLinear instead of its own forward."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            def forward(x, module=module):
                dropout = module.lora_dropout["default"]
                p = dropout.p if isinstance(dropout, torch.nn.Dropout) and module.training else 0.0
                return FusedLoraLinear.apply(x, module.base_layer.weight, module.lora_A["default"].weight,
                                             module.lora_B["default"].weight, module.scaling["default"], p)
            module.forward = forward
    return model


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = LlamaDecoderLayer(CONFIG, 0)

    def forward(self, hidden, cos, sin, positions):
        out = self.layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


def frozen_layer():
    torch.manual_seed(0)
    layer = OneLayer().to(torch.bfloat16)
    layer.requires_grad_(False)
    return layer


def lora_layer(dropout):
    model = get_peft_model(frozen_layer(), LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=LINEARS))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
            if parameter.dim() == 2 and not parameter.abs().sum():  # B starts at zero; the trial must check a real product
                torch.nn.init.normal_(parameter, std=0.02)
    return model


def fused_against_peft(tokens, device):
    """The largest relative difference between the two LoRA layers (dropout 0): output, input gradient, A's and B's."""
    found = {}
    for fused in (False, True):
        model = lora_layer(0.0).to(device)
        model = fuse_lora_linears(model) if fused else model
        hidden = torch.randn(1, tokens, CONFIG.hidden_size, device=device, generator=torch.Generator(device).manual_seed(1))
        hidden = hidden.to(torch.bfloat16).requires_grad_()
        positions = torch.arange(tokens, device=device)[None]
        cos, sin = LlamaRotaryEmbedding(CONFIG).to(device)(hidden, positions)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(hidden, cos, sin, positions)
        out.float().square().mean().backward()
        lora = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad}
        found[fused] = {"output": out.float(), "input gradient": hidden.grad.float()} | {
            name: grad.float() for name, grad in lora.items() if name.endswith(("q_proj.lora_A.default.weight", "down_proj.lora_B.default.weight"))}
    return {name: ((found[True][name] - expected).abs().max() / expected.abs().max()).item()
            for name, expected in found[False].items()}


def milliseconds_per_layer(model, tokens):
    model = model.cuda()
    hidden = torch.randn(1, tokens, CONFIG.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens, device="cuda")[None]
    cos, sin = LlamaRotaryEmbedding(CONFIG).cuda()(hidden, positions)
    compiled = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(hidden, cos, sin, positions)
        out.float().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(8):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(5):
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / 50)
    return sorted(runs)[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2640, help="rows of one step (issue 7's mean: 8 x 330)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    differences = fused_against_peft(256, "cuda")
    print("fused against peft, largest relative differences:", differences, flush=True)
    results = {"frozen base": milliseconds_per_layer(frozen_layer(), args.tokens)}
    print(f"frozen base: {results['frozen base']:.3f} ms per layer", flush=True)
    for dropout in (0.05, 0.0):
        for fused in (False, True):
            model = lora_layer(dropout)
            name = f"lora r16 dropout {dropout}" + (", fused additions" if fused else "")
            results[name] = milliseconds_per_layer(fuse_lora_linears(model) if fused else model, args.tokens)
            print(f"{name}: {results[name]:.3f} ms per layer", flush=True)
    if args.out:
        args.out.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "tokens": args.tokens, "ms_per_layer": results,
            "fused_against_peft_relative_differences": differences,
            "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                         "transformers": __import__("transformers").__version__},
        }, indent=1))


if __name__ == "__main__":
    main()
