"""The launch settings of the LoRA dropout kernel (workers/training/lora_dropout.py), swept on a GPU.

    python bench/lora_dropout_sweep.py --out results/lora-dropout-sweep.json

Times the forward (with the sum of its parts) and the backward kernel at one step's 2,640 rows of
issue 7's 1B shape, 2,048 wide (q, k, v, o, gate, up) and 8,192 wide (down), rank 16, dropout 0.05,
for each block shape, warps and pipeline stages; beside them torch's dropout then matmul, forward
and backward, eager. Prints the fastest settings; the module's constants are the best of both widths.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.training import lora_dropout  # noqa: E402

ROWS, RANK, DROPOUT = 2640, 16, 0.05


def sweep(columns):
    torch.manual_seed(0)
    x = torch.randn(ROWS, columns, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(RANK, columns, device="cuda", dtype=torch.bfloat16) * 0.02
    grad_h = torch.randn(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([7], device="cuda")
    drop_below, keep_scale = lora_dropout._drop_below(DROPOUT), 1 / (1 - DROPOUT)
    x_torch, a_torch = x.clone().requires_grad_(), a.clone().requires_grad_()

    def torch_dropout_then_matmul():
        (torch.nn.functional.dropout(x_torch, DROPOUT) @ a_torch.t()).backward(grad_h)

    forward = []
    for rows, block_columns, per_program, warps, stages in itertools.product([16, 32], [128, 256], [256, 512, 1024, 2048], [4, 8], [2, 3, 4]):
        if per_program < block_columns:
            continue
        h_parts = torch.empty((1, triton.cdiv(columns, per_program), ROWS, RANK), device="cuda", dtype=torch.float32)

        def run():
            lora_dropout._forward_kernel[(triton.cdiv(ROWS, rows), h_parts.shape[1])](
                x, x, a, a, a, seed, seed, seed, h_parts, ROWS, columns, x.stride(0), 0, drop_below, keep_scale,
                BRANCHES=1, JOIN=False, RANK=RANK, RANK_BLOCK=16, BLOCK_ROWS=rows, BLOCK_COLUMNS=block_columns,
                COLUMNS_PER_PROGRAM=per_program, num_warps=warps, num_stages=stages)
            return h_parts[0].sum(0).to(torch.bfloat16)
        forward.append((1000 * do_bench(run), rows, block_columns, per_program, warps, stages))
    backward = []
    for rows, block_columns, blocks, warps, stages in itertools.product([32, 64, 128], [64, 128], [1, 2, 4], [4, 8], [2, 3]):
        parts = triton.cdiv(ROWS, rows * blocks)
        grad_x, grad_a_parts = torch.empty_like(x), torch.empty((1, parts, RANK, columns), device="cuda", dtype=torch.float32)

        def run():
            lora_dropout._backward_kernel[(triton.cdiv(columns, block_columns), parts)](
                x, a, a, a, seed, seed, seed, grad_h, grad_h, grad_h, grad_h.stride(0), grad_h, grad_h, grad_h,
                grad_h.stride(0), grad_x, grad_a_parts, ROWS, columns, x.stride(0), drop_below, keep_scale,
                BRANCHES=1, ADD_BASES=False, RANK=RANK, RANK_BLOCK=16, BLOCK_ROWS=rows, BLOCK_COLUMNS=block_columns,
                BLOCKS_PER_PROGRAM=blocks, num_warps=warps, num_stages=stages)
            return grad_a_parts[0].sum(0)
        backward.append((1000 * do_bench(run), rows, block_columns, blocks, warps, stages))
    forward.sort()
    backward.sort()
    return {"torch_dropout_then_matmul_us": 1000 * do_bench(torch_dropout_then_matmul),
            "forward_us (rows, columns, per program, warps, stages)": forward[:10],
            "backward_us (rows, columns, blocks per program, warps, stages)": backward[:10]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "rows": ROWS, "rank": RANK, "dropout": DROPOUT}
    for columns in (2048, 8192):
        results[f"{columns} wide"] = found = sweep(columns)
        print(columns, json.dumps(found, indent=None)[:600], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
