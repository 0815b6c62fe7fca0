"""The launch settings of the LoRA kernels (workers/training/lora_kernels.py), swept on a GPU.

    python bench/lora_kernels_sweep.py --out results/lora-kernels-sweep.json

At one step's 2,640 rows of issue 7's 1B shape, rank 16, dropout 0.05, for each block shape, warps
and pipeline stages: dropout_down's forward (with the sum of its parts) and backward, 2,048 wide
(q, k, v, o, gate, up) and 8,192 wide (down), beside torch's dropout then matmul, forward and
backward, eager; and up_project's backward, 512, 2,048 and 8,192 outputs wide, beside cuBLAS's two
matmuls for the same gradients. Prints the fastest settings; the module's constants are the best
over the widths.
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
from workers.training import lora_kernels  # noqa: E402

ROWS, RANK, DROPOUT = 2640, 16, 0.05


def sweep(columns):
    torch.manual_seed(0)
    x = torch.randn(ROWS, columns, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(RANK, columns, device="cuda", dtype=torch.bfloat16) * 0.02
    grad_h = torch.randn(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([7], device="cuda")
    drop_below, keep_scale = lora_kernels._drop_below(DROPOUT), 1 / (1 - DROPOUT)
    x_torch, a_torch = x.clone().requires_grad_(), a.clone().requires_grad_()

    def torch_dropout_then_matmul():
        (torch.nn.functional.dropout(x_torch, DROPOUT) @ a_torch.t()).backward(grad_h)

    forward = []
    for rows, block_columns, per_program, warps, stages in itertools.product([16, 32], [128, 256], [256, 512, 1024, 2048], [4, 8], [2, 3, 4]):
        if per_program < block_columns:
            continue
        h_parts = torch.empty((triton.cdiv(columns, per_program), ROWS, RANK), device="cuda", dtype=torch.float32)

        def run():
            lora_kernels._forward_kernel[(triton.cdiv(ROWS, rows), h_parts.shape[0])](
                x, a, h_parts, seed, ROWS, columns, x.stride(0), drop_below, keep_scale, RANK=RANK, RANK_BLOCK=16,
                BLOCK_ROWS=rows, BLOCK_COLUMNS=block_columns, COLUMNS_PER_PROGRAM=per_program, num_warps=warps, num_stages=stages)
            return h_parts.sum(0).to(torch.bfloat16)
        forward.append((1000 * do_bench(run), rows, block_columns, per_program, warps, stages))
    backward = []
    for rows, block_columns, blocks, warps, stages in itertools.product([32, 64, 128], [64, 128], [1, 2, 4], [4, 8], [2, 3]):
        parts = triton.cdiv(ROWS, rows * blocks)
        grad_x, grad_a_parts = torch.empty_like(x), torch.empty((parts, RANK, columns), device="cuda", dtype=torch.float32)

        def run():
            lora_kernels._backward_kernel[(triton.cdiv(columns, block_columns), parts)](
                x, a, grad_h, grad_x, grad_a_parts, seed, ROWS, columns, x.stride(0), drop_below, keep_scale, RANK=RANK,
                RANK_BLOCK=16, BLOCK_ROWS=rows, BLOCK_COLUMNS=block_columns, BLOCKS_PER_PROGRAM=blocks,
                num_warps=warps, num_stages=stages)
            return grad_a_parts.sum(0)
        backward.append((1000 * do_bench(run), rows, block_columns, blocks, warps, stages))
    forward.sort()
    backward.sort()
    return {"torch_dropout_then_matmul_us": 1000 * do_bench(torch_dropout_then_matmul),
            "forward_us (rows, columns, per program, warps, stages)": forward[:10],
            "backward_us (rows, columns, blocks per program, warps, stages)": backward[:10]}


def sweep_up_backward(columns):
    torch.manual_seed(0)
    grad = torch.randn(ROWS, columns, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(columns, RANK, device="cuda", dtype=torch.bfloat16) * 0.02

    def cublas():
        return grad @ b, grad.t() @ h

    found = []
    for rows, block_columns, per_program, warps, stages in itertools.product([128, 256], [64, 128], [256, 512, 1024], [4, 8], [2, 3]):
        if per_program < block_columns or per_program > columns:
            continue
        chunks, splits = triton.cdiv(ROWS, rows), triton.cdiv(columns, per_program)
        grad_h_parts = torch.empty((splits, ROWS, RANK), device="cuda", dtype=torch.float32)
        grad_b_parts = torch.empty((chunks, columns, RANK), device="cuda", dtype=torch.float32)

        def run():
            lora_kernels._up_backward_kernel[(chunks, splits)](
                grad, h, b, grad_h_parts, grad_b_parts, ROWS, columns, grad.stride(0), 2.0, RANK=RANK, RANK_BLOCK=16,
                BLOCK_ROWS=rows, BLOCK_COLUMNS=block_columns, COLUMNS_PER_PROGRAM=per_program, num_warps=warps, num_stages=stages)
            return grad_h_parts.sum(0).to(torch.bfloat16), grad_b_parts.sum(0)
        try:
            found.append((1000 * do_bench(run), rows, block_columns, per_program, warps, stages))
        except Exception as error:  # a block too big for the GPU's shared memory
            print("skipped", rows, block_columns, per_program, warps, stages, str(error)[:80])
    found.sort()
    return {"cublas_two_matmuls_us": 1000 * do_bench(cublas),
            "up_backward_us (rows, columns, per program, warps, stages)": found[:10]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kernels", nargs="*", choices=["down", "up"], default=["down", "up"],
                        help="dropout_down's kernels, up_project's backward, or both")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "rows": ROWS, "rank": RANK, "dropout": DROPOUT}
    for columns in (2048, 8192) if "down" in args.kernels else ():
        results[f"{columns} wide"] = found = sweep(columns)
        print(columns, json.dumps(found, indent=None)[:600], flush=True)
    for columns in (512, 2048, 8192) if "up" in args.kernels else ():
        results[f"B's backward, {columns} wide"] = found = sweep_up_backward(columns)
        print("B's backward", columns, json.dumps(found, indent=None)[:600], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
