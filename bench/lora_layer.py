"""What LoRA's branches cost on a GPU: one decoder layer of the Llama-1B shape, forward and backward.

    python bench/lora_layer.py [--tokens 2640] [--out results/lora-layer.json]

The same layer, compiled and replayed as a CUDA graph, at the tokens of one step of issue 7's
benchmark: the frozen bf16 base alone (gradients to the input only, as under any frozen method),
then with peft LoRA (r=16, alpha=32, all seven linears, float32 adapter weights under bf16 autocast,
as the engine trains) at dropout 0.05 and 0, and at dropout 0.05 with the engine's Triton kernel for
the dropout and A's product (workers/training/lora_dropout.py). Attention here is SDPA over the
whole row (no packing); it is the same in all. Prints and writes milliseconds per layer (median of
5 runs of 50 replays); --profile also prints the GPU kernels of one step of the two dropout-0.05
layers, longest first.

(A trial of B's product added into the base matmul's output by cuBLAS, addmm, measured no faster
than peft: bench/README.md, and this file at commit 2f06386.)
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.training.lora_dropout import use_dropout_kernel  # noqa: E402

CONFIG = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                     num_hidden_layers=1, vocab_size=128256, attn_implementation="sdpa")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    return model


def kernel_layer():
    model = lora_layer(0.05)
    assert use_dropout_kernel(model) == len(LINEARS)
    return model


def milliseconds_per_layer(model, tokens, profile=False):
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
    if profile:  # a warm step's kernels, launched one by one (the graph below replays the same)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            step()
            torch.cuda.synchronize()
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90), flush=True)
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
    parser.add_argument("--profile", action="store_true", help="print the kernels of the dropout-0.05 layers")
    args = parser.parse_args()
    layers = {
        "frozen base": frozen_layer,
        "lora r16 dropout 0.05": lambda: lora_layer(0.05),
        "lora r16 dropout 0.05, dropout kernel": kernel_layer,
        "lora r16 dropout 0.0": lambda: lora_layer(0.0),
    }
    results = {}
    for name, make in layers.items():
        model = make()
        results[name] = milliseconds_per_layer(model, args.tokens, profile=args.profile and "0.05" in name)
        print(f"{name}: {results[name]:.3f} ms per layer", flush=True)
    if args.out:
        args.out.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "tokens": args.tokens, "ms_per_layer": results,
            "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                         "transformers": __import__("transformers").__version__},
        }, indent=1))


if __name__ == "__main__":
    main()
