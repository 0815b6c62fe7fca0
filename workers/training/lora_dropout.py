"""LoRA's dropout and down-projection as one Triton kernel, forward and backward.

peft computes a LoRA branch as lora_B(lora_A(dropout(x))). On the 1B benchmark of issue 7 the
dropout alone cost 3.3 ms of a 40 ms step (bench/lora_layer.py): for each of a layer's seven
linears it draws a random number per input element, writes the mask and a dropped copy of the
input, and reads both back in the backward. Here one kernel reads x once, draws the mask as it
goes and returns only h = dropout(x) A^T, a few columns wide; the backward draws the same mask
again from the step's seed instead of keeping it. One Philox draw gives eight 16-bit numbers, so
eight mask entries (a drop chance of p rounded to 1/65536). The kernel also applies LoRA's scaling,
to h rather than to B's product. lora_B, the saved adapter and everything peft does around the
branch are unchanged: only lora_A(dropout(x)) * scaling is computed here, as the same function of
the same weights. Linears that read the same x (SharedInput: q, k and v; gate and up) have their
branches drawn in one call, each with its own mask, reading x once.

The engine's default on a bf16 GPU for LoRA with dropout (speed.use_lora_dropout_kernel). Not yet for
QLoRA's quantized linears, whose step recomputes each layer (gradient checkpointing) and has not been
run on a GPU with it.
"""

import itertools

import torch
import triton
import triton.language as tl
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.library import triton_op, wrap_triton

# One Philox call draws four 32-bit numbers, eight 16-bit ones: eight neighbouring inputs' masks.
MASKS_PER_DRAW = 8
# Rounds of Philox4x32 per draw. Its authors found it passing TestU01's BigCrush from 7 rounds and chose 10,
# Triton's default, as a margin (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"). A dropout
# mask needs no more than BigCrush's independence; the draws were a fifth of the kernels' time, and 7 rounds
# made the step 1% faster (bench/README.md, eleventh pass).
PHILOX_ROUNDS = tl.constexpr(7)
DROP_RESOLUTION = 1 << 16
# Launch settings, the fastest of a sweep on an H100 at one step's 2,640 rows, 2,048 and 8,192 wide
# (bench/README.md). The forward splits the width over programs as well as the rows, so that a
# step's few thousand rows still make enough programs to fill the GPU.
ROWS_PER_BLOCK = 16
COLUMNS_PER_BLOCK = 128
COLUMNS_PER_PROGRAM = 512
FORWARD_WARPS, FORWARD_STAGES = 4, 3
BACKWARD_ROWS_PER_BLOCK = 64
BACKWARD_COLUMNS_PER_BLOCK = 64
BACKWARD_BLOCKS_PER_PROGRAM = 2  # row blocks one backward program walks, summing its share of A's gradient
BACKWARD_WARPS, BACKWARD_STAGES = 4, 2
# Branches one kernel call computes, reading their x once: q, k and v at most.
MAX_BRANCHES = 3
JOIN_ROWS_PER_BLOCK = 64


@triton.jit
def _kept(seed, rows, first_column, columns, drop_below, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """Which of a block's inputs dropout keeps: a function of (seed, row, column) alone, whatever the blocks."""
    groups = first_column // 8 + tl.arange(0, BLOCK_COLUMNS // 8)
    offsets = rows[:, None] * (columns // 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offsets, PHILOX_ROUNDS)
    low = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
    high = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
    draws = tl.reshape(tl.join(low, high), (BLOCK_ROWS, BLOCK_COLUMNS))
    return draws.to(tl.int32) >= drop_below


@triton.jit
def _branch_down(x, a_ptr, seed, rows, first_column, columns, drop_below, RANK: tl.constexpr, RANK_BLOCK: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """One branch's share of h from a block of x: the block dropped with the branch's mask, times A's rows for it."""
    cols = first_column + tl.arange(0, BLOCK_COLUMNS)
    ranks = tl.arange(0, RANK_BLOCK)
    kept = _kept(seed, rows, first_column, columns, drop_below, BLOCK_ROWS, BLOCK_COLUMNS)
    a = tl.load(a_ptr + ranks[None, :] * columns + cols[:, None], mask=(ranks[None, :] < RANK) & (cols[:, None] < columns), other=0.0)
    return tl.dot(tl.where(kept, x, tl.zeros_like(x)), a)


@triton.jit
def _store_part(parts_ptr, value, branch, part, parts, row_ids, rows_count, column_ids, columns):
    """A program's part of a [branches, parts, rows, columns] float32 buffer whose parts are summed after."""
    first = (branch * parts + part) * rows_count * columns
    tl.store(parts_ptr + first + row_ids[:, None] * columns + column_ids[None, :], value,
             mask=(row_ids[:, None] < rows_count) & (column_ids[None, :] < columns))


@triton.jit
def _forward_kernel(
    x_ptr, joined_ptr, a0_ptr, a1_ptr, a2_ptr, seed0_ptr, seed1_ptr, seed2_ptr, h_parts_ptr,
    rows_count, columns, x_row_stride, joined_row_stride, drop_below, keep_scale,
    BRANCHES: tl.constexpr, JOIN: tl.constexpr, RANK: tl.constexpr, RANK_BLOCK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, COLUMNS_PER_PROGRAM: tl.constexpr,
):
    """h's parts for up to three branches that read the same x, each with a mask of its own; with JOIN, x copied too."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ranks = tl.arange(0, RANK_BLOCK)
    part, parts = tl.program_id(1), tl.num_programs(1)
    seed0, seed1, seed2 = tl.load(seed0_ptr), tl.load(seed1_ptr), tl.load(seed2_ptr)
    h0 = tl.zeros((BLOCK_ROWS, RANK_BLOCK), dtype=tl.float32)
    h1 = tl.zeros((BLOCK_ROWS, RANK_BLOCK), dtype=tl.float32)
    h2 = tl.zeros((BLOCK_ROWS, RANK_BLOCK), dtype=tl.float32)
    for first_column in range(part * COLUMNS_PER_PROGRAM, (part + 1) * COLUMNS_PER_PROGRAM, BLOCK_COLUMNS):
        cols = first_column + tl.arange(0, BLOCK_COLUMNS)
        inside = (rows[:, None] < rows_count) & (cols[None, :] < columns)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
        if JOIN:
            tl.store(joined_ptr + rows[:, None] * joined_row_stride + cols[None, :], x, mask=inside)
        h0 += _branch_down(x, a0_ptr, seed0, rows, first_column, columns, drop_below, RANK, RANK_BLOCK, BLOCK_ROWS, BLOCK_COLUMNS)
        if BRANCHES > 1:
            h1 += _branch_down(x, a1_ptr, seed1, rows, first_column, columns, drop_below, RANK, RANK_BLOCK, BLOCK_ROWS, BLOCK_COLUMNS)
        if BRANCHES > 2:
            h2 += _branch_down(x, a2_ptr, seed2, rows, first_column, columns, drop_below, RANK, RANK_BLOCK, BLOCK_ROWS, BLOCK_COLUMNS)
    _store_part(h_parts_ptr, h0 * keep_scale, 0, part, parts, rows, rows_count, ranks, RANK)
    if BRANCHES > 1:
        _store_part(h_parts_ptr, h1 * keep_scale, 1, part, parts, rows, rows_count, ranks, RANK)
    if BRANCHES > 2:
        _store_part(h_parts_ptr, h2 * keep_scale, 2, part, parts, rows, rows_count, ranks, RANK)


@triton.jit
def _join_kernel(h_parts_ptr, h_ptr, joined_ptr, rows_count, joined_row_stride, first_column,
                 PARTS: tl.constexpr, RANK: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """A branch's h from its parts, written both alone and into its columns of the joined rows."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    branch = tl.program_id(1)
    ranks = tl.arange(0, RANK_BLOCK)
    inside = (rows[:, None] < rows_count) & (ranks[None, :] < RANK)
    h = tl.zeros((BLOCK_ROWS, RANK_BLOCK), dtype=tl.float32)
    for part in tl.static_range(PARTS):
        h += tl.load(h_parts_ptr + (branch * PARTS + part) * rows_count * RANK + rows[:, None] * RANK + ranks[None, :], mask=inside)
    h = h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + branch * rows_count * RANK + rows[:, None] * RANK + ranks[None, :], h, mask=inside)
    tl.store(joined_ptr + rows[:, None] * joined_row_stride + first_column + branch * RANK + ranks[None, :], h, mask=inside)


@triton.jit
def _branch_up(x, a, seed, grad_h_ptr, grad_h_row_stride, rows, first_column, rows_count, columns, drop_below,
               RANK: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """One branch's share of x's gradient for a block (unscaled) and of A's gradient."""
    ranks = tl.arange(0, RANK_BLOCK)
    kept = _kept(seed, rows, first_column, columns, drop_below, BLOCK_ROWS, BLOCK_COLUMNS)
    grad_h = tl.load(grad_h_ptr + rows[:, None] * grad_h_row_stride + ranks[None, :],
                     mask=(rows[:, None] < rows_count) & (ranks[None, :] < RANK), other=0.0)
    grad_a = tl.dot(tl.trans(grad_h), tl.where(kept, x, tl.zeros_like(x)))
    return tl.where(kept, tl.dot(grad_h, a), 0.0), grad_a


@triton.jit
def _load_a(a_ptr, cols, columns, RANK: tl.constexpr, RANK_BLOCK: tl.constexpr):
    ranks = tl.arange(0, RANK_BLOCK)
    return tl.load(a_ptr + ranks[:, None] * columns + cols[None, :], mask=(ranks[:, None] < RANK) & (cols[None, :] < columns), other=0.0)


@triton.jit
def _backward_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, seed0_ptr, seed1_ptr, seed2_ptr, grad_h0_ptr, grad_h1_ptr, grad_h2_ptr,
    grad_h_row_stride, base0_ptr, base1_ptr, base2_ptr, base_row_stride, grad_x_ptr, grad_a_parts_ptr,
    rows_count, columns, x_row_stride, drop_below, keep_scale,
    BRANCHES: tl.constexpr, ADD_BASES: tl.constexpr, RANK: tl.constexpr, RANK_BLOCK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    """x's gradient through up to three branches, with ADD_BASES each branch's base share added; A's gradients' parts."""
    first_column = tl.program_id(0) * BLOCK_COLUMNS
    cols = first_column + tl.arange(0, BLOCK_COLUMNS)
    ranks = tl.arange(0, RANK_BLOCK)
    part, parts = tl.program_id(1), tl.num_programs(1)
    seed0, seed1, seed2 = tl.load(seed0_ptr), tl.load(seed1_ptr), tl.load(seed2_ptr)
    a0 = _load_a(a0_ptr, cols, columns, RANK, RANK_BLOCK)
    a1 = _load_a(a1_ptr, cols, columns, RANK, RANK_BLOCK) if BRANCHES > 1 else a0
    a2 = _load_a(a2_ptr, cols, columns, RANK, RANK_BLOCK) if BRANCHES > 2 else a0
    grad_a0 = tl.zeros((RANK_BLOCK, BLOCK_COLUMNS), dtype=tl.float32)
    grad_a1 = tl.zeros((RANK_BLOCK, BLOCK_COLUMNS), dtype=tl.float32)
    grad_a2 = tl.zeros((RANK_BLOCK, BLOCK_COLUMNS), dtype=tl.float32)
    for block in range(BLOCKS_PER_PROGRAM):
        rows = (part * BLOCKS_PER_PROGRAM + block) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        inside = (rows[:, None] < rows_count) & (cols[None, :] < columns)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
        through_branches, grad_a = _branch_up(x, a0, seed0, grad_h0_ptr, grad_h_row_stride, rows, first_column, rows_count,
                                              columns, drop_below, RANK, RANK_BLOCK, BLOCK_ROWS, BLOCK_COLUMNS)
        grad_a0 += grad_a
        if BRANCHES > 1:
            through, grad_a = _branch_up(x, a1, seed1, grad_h1_ptr, grad_h_row_stride, rows, first_column, rows_count,
                                         columns, drop_below, RANK, RANK_BLOCK, BLOCK_ROWS, BLOCK_COLUMNS)
            through_branches += through
            grad_a1 += grad_a
        if BRANCHES > 2:
            through, grad_a = _branch_up(x, a2, seed2, grad_h2_ptr, grad_h_row_stride, rows, first_column, rows_count,
                                         columns, drop_below, RANK, RANK_BLOCK, BLOCK_ROWS, BLOCK_COLUMNS)
            through_branches += through
            grad_a2 += grad_a
        grad_x = through_branches * keep_scale
        if ADD_BASES:  # added in the kernel's precision (float32 for bf16), as the branches' shares are
            grad_x += tl.load(base0_ptr + rows[:, None] * base_row_stride + cols[None, :], mask=inside, other=0.0)
            if BRANCHES > 1:
                grad_x += tl.load(base1_ptr + rows[:, None] * base_row_stride + cols[None, :], mask=inside, other=0.0)
            if BRANCHES > 2:
                grad_x += tl.load(base2_ptr + rows[:, None] * base_row_stride + cols[None, :], mask=inside, other=0.0)
        tl.store(grad_x_ptr + rows[:, None] * columns + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)
    _store_part(grad_a_parts_ptr, grad_a0 * keep_scale, 0, part, parts, ranks, RANK, cols, columns)
    if BRANCHES > 1:
        _store_part(grad_a_parts_ptr, grad_a1 * keep_scale, 1, part, parts, ranks, RANK, cols, columns)
    if BRANCHES > 2:
        _store_part(grad_a_parts_ptr, grad_a2 * keep_scale, 2, part, parts, ranks, RANK, cols, columns)


def _drop_below(p):
    return round(p * DROP_RESOLUTION)


def _rank_block(rank):
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest side


def _three(tensors):
    """Up to three branches' tensors as the kernels' three arguments; the first stands in for those not there."""
    assert 1 <= len(tensors) <= MAX_BRANCHES
    return [*tensors, *[tensors[0]] * (MAX_BRANCHES - len(tensors))]


def _down_parts(rows, lora_as, seeds, p, scaling, joined=None):
    """Each branch's h, in float32 parts to be summed: [branches, parts, rows, rank]. Into `joined`, x's copy if given."""
    rank, columns = lora_as[0].shape
    # Each program sums over its share of the width; the shares are added after, in a fixed order (no atomics).
    parts = triton.cdiv(columns, COLUMNS_PER_PROGRAM)
    h_parts = torch.empty((len(lora_as), parts, rows.shape[0], rank), dtype=torch.float32, device=rows.device)
    wrap_triton(_forward_kernel)[(triton.cdiv(rows.shape[0], ROWS_PER_BLOCK), parts)](
        rows, rows if joined is None else joined, *_three(lora_as), *_three(seeds), h_parts, rows.shape[0], columns,
        rows.stride(0), 0 if joined is None else joined.stride(0), _drop_below(p), scaling / (1 - p),
        BRANCHES=len(lora_as), JOIN=joined is not None, RANK=rank, RANK_BLOCK=_rank_block(rank),
        BLOCK_ROWS=ROWS_PER_BLOCK, BLOCK_COLUMNS=COLUMNS_PER_BLOCK, COLUMNS_PER_PROGRAM=COLUMNS_PER_PROGRAM,
        num_warps=FORWARD_WARPS, num_stages=FORWARD_STAGES,
    )
    return h_parts


def _up(rows, lora_as, seeds, grad_hs, p, scaling, bases=None):
    """x's gradient (plus the bases' shares, if given) and each A's, from each branch's h gradient (all one row stride)."""
    rank, columns = lora_as[0].shape
    parts = triton.cdiv(rows.shape[0], BACKWARD_ROWS_PER_BLOCK * BACKWARD_BLOCKS_PER_PROGRAM)
    grad_x = torch.empty((rows.shape[0], columns), dtype=rows.dtype, device=rows.device)
    # As in the forward, A's gradients are summed in parts, one per program's rows.
    grad_a_parts = torch.empty((len(lora_as), parts, rank, columns), dtype=torch.float32, device=rows.device)
    wrap_triton(_backward_kernel)[(triton.cdiv(columns, BACKWARD_COLUMNS_PER_BLOCK), parts)](
        rows, *_three(lora_as), *_three(seeds), *_three(grad_hs), grad_hs[0].stride(0),
        *_three(bases or grad_hs), (bases or grad_hs)[0].stride(0), grad_x, grad_a_parts,
        rows.shape[0], columns, rows.stride(0), _drop_below(p), scaling / (1 - p),
        BRANCHES=len(lora_as), ADD_BASES=bases is not None, RANK=rank, RANK_BLOCK=_rank_block(rank),
        BLOCK_ROWS=BACKWARD_ROWS_PER_BLOCK, BLOCK_COLUMNS=BACKWARD_COLUMNS_PER_BLOCK,
        BLOCKS_PER_PROGRAM=BACKWARD_BLOCKS_PER_PROGRAM, num_warps=BACKWARD_WARPS, num_stages=BACKWARD_STAGES,
    )
    return grad_x, [grad_a.to(lora_as[0].dtype) for grad_a in grad_a_parts.sum(1)]


@triton_op("tunedeck::lora_dropout_down", mutates_args=())
def dropout_down(
    x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, scaling: float
) -> torch.Tensor:
    """dropout(x, p) @ lora_a.T * scaling, the mask drawn from `seed` (a one-element int64 tensor on x's device)."""
    h_parts = _down_parts(x.reshape(-1, x.shape[-1]), [lora_a], [seed], p, scaling)
    return h_parts[0].sum(0).to(x.dtype).view(*x.shape[:-1], lora_a.shape[0])


@triton_op("tunedeck::lora_dropout_down_backward", mutates_args=())
def dropout_down_backward(
    x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, grad_h: torch.Tensor, p: float, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_h = grad_h.reshape(-1, grad_h.shape[-1]).contiguous()
    grad_x, (grad_a,) = _up(x.reshape(-1, x.shape[-1]), [lora_a], [seed], [grad_h], p, scaling)
    return grad_x.view(x.shape), grad_a


def _setup_context(ctx, inputs, output):
    x, lora_a, seed, p, scaling = inputs
    ctx.save_for_backward(x, lora_a, seed)
    ctx.p, ctx.scaling = p, scaling


def _backward(ctx, grad_h):
    x, lora_a, seed = ctx.saved_tensors
    grad_x, grad_a = dropout_down_backward(x, lora_a, seed, grad_h, ctx.p, ctx.scaling)
    return grad_x, grad_a, None, None, None


dropout_down.register_autograd(_backward, setup_context=_setup_context)


@triton_op("tunedeck::lora_dropout_down_joined", mutates_args=())
def dropout_down_joined(
    x: torch.Tensor, lora_as: list[torch.Tensor], seeds: list[torch.Tensor], p: float, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """[x | h_1 | ... | h_n] as rows, with h_i = dropout(x) @ lora_as[i].T * scaling under seeds[i]'s mask; and the h's.

    One kernel reads x once for all the branches and writes its copy into the joined rows, where a join
    after the branches would read it once more.
    """
    rows = x.reshape(-1, x.shape[-1])
    rank = lora_as[0].shape[0]
    joined = torch.empty((rows.shape[0], rows.shape[1] + len(lora_as) * rank), dtype=x.dtype, device=x.device)
    h = torch.empty((len(lora_as), rows.shape[0], rank), dtype=x.dtype, device=x.device)
    h_parts = _down_parts(rows, lora_as, seeds, p, scaling, joined)
    # A kernel rather than a slice assignment, which torch.compile made a copy of the whole joined rows.
    wrap_triton(_join_kernel)[(triton.cdiv(rows.shape[0], JOIN_ROWS_PER_BLOCK), len(lora_as))](
        h_parts, h, joined, rows.shape[0], joined.stride(0), rows.shape[1],
        PARTS=h_parts.shape[1], RANK=rank, RANK_BLOCK=_rank_block(rank), BLOCK_ROWS=JOIN_ROWS_PER_BLOCK,
    )
    return joined, h


@triton_op("tunedeck::lora_dropout_down_joined_backward", mutates_args=())
def dropout_down_joined_backward(
    x: torch.Tensor, lora_as: list[torch.Tensor], seeds: list[torch.Tensor], bases: list[torch.Tensor], p: float,
    scaling: float,
) -> list[torch.Tensor]:
    """x's gradient and each A's for dropout_down_joined, given each branch's [x's gradient share | h's gradients].

    bases[i] is the gradient of branch i's output times its rows of the shared matrix: x's gradient through the
    base weight in its first columns, h_i's gradient at h_i's columns. The kernel adds the bases' shares to what
    it computes, so that x's gradient is written once, not once per branch and once more for their sum.
    """
    rows = x.reshape(-1, x.shape[-1])
    rank = lora_as[0].shape[0]
    grad_hs = [base[:, rows.shape[1] + index * rank :] for index, base in enumerate(bases)]
    grad_x, grad_as = _up(rows, lora_as, seeds, grad_hs, p, scaling, bases)
    return [grad_x.view(x.shape), *grad_as]


def mask(seed, rows, columns, p):
    """The keep mask dropout_down draws for an input of this shape (for checking it)."""
    kept = torch.empty((rows, columns), dtype=torch.bool, device=seed.device)
    grid = (triton.cdiv(rows, ROWS_PER_BLOCK), triton.cdiv(columns, COLUMNS_PER_BLOCK))
    _mask_kernel[grid](kept, seed, rows, columns, _drop_below(p), BLOCK_ROWS=ROWS_PER_BLOCK, BLOCK_COLUMNS=COLUMNS_PER_BLOCK)
    return kept


@triton.jit
def _mask_kernel(kept_ptr, seed_ptr, rows_count, columns, drop_below, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    kept = _kept(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_COLUMNS, columns, drop_below, BLOCK_ROWS, BLOCK_COLUMNS)
    tl.store(kept_ptr + rows[:, None] * columns + cols[None, :], kept, mask=(rows[:, None] < rows_count) & (cols[None, :] < columns))


def lora_forward(module, x, *args, **kwargs):
    """peft's LoRA Linear forward, with lora_A(dropout(x)) from dropout_down while training; peft's own otherwise."""
    adapter = module.active_adapters[0] if len(module.active_adapters) == 1 else None
    dropout = module.lora_dropout[adapter] if adapter in module.lora_A else None
    if (
        not module.training
        or not isinstance(dropout, torch.nn.Dropout)
        or module.disable_adapters
        or module.merged
        or adapter in module.lora_variant
        or kwargs.get("adapter_names") is not None
    ):
        return type(module).forward(module, x, *args, **kwargs)
    kwargs.pop("adapter_names", None)  # peft's, not the base layer's
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    shared_input = getattr(module, "shared_input", None)
    if shared_input is not None and not args and not kwargs:
        return shared_input(module, x.to(half))
    result = module.base_layer(x, *args, **kwargs)
    # Drawn on the GPU as part of the step, so that a replayed CUDA graph draws a new one each time.
    seed = getattr(module, "dropout_seed", None)
    if seed is None:
        seed = torch.randint(2**31 - 1, (1,), device=x.device)
    # StepInputs' copies of A and B where it made them; else A cast here, and peft's lora_B (which may hold a bias).
    lora_a, lora_b = getattr(module, "half_copies", {}).get(adapter) or (module.lora_A[adapter].weight.to(half), None)
    # Scaled here, h (rank wide) rather than B's product (as wide as the output): a scaled product's gradient
    # would be a copy of the output's gradient, written and read back for each linear.
    h = dropout_down(x.to(half), lora_a, seed, dropout.p, module.scaling[adapter])
    up = module.lora_B[adapter](h) if lora_b is None else torch.nn.functional.linear(h, lora_b)
    return (result + up).to(result.dtype)


# Linears that read the same input, by the names Llama-like models give them.
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """Routed linears that read the same x (q, k and v; gate and up) as one matmul, their LoRA branches inside it.

    peft adds each branch's B product to its base's output: a rank-16 matmul as wide as the output, whose
    result is written and read back, and whose backward reads the output's gradient once more for h's.
    Here the bases' weights and the B's are one matrix, [[W_q, B_q, 0, 0], [W_k, 0, B_k, 0], [W_v, 0, 0, B_v]]:
    [x | h_q | h_k | h_v] times it gives every output with its branch added, and in the backward each output's
    gradient times its rows of the matrix gives x's gradient (the bases' share) and the h's together. The bases'
    weights become views of the matrix, so it takes no more memory; StepInputs copies the B's into it at the
    start of each step. The h's come from one dropout kernel that reads x once for all the branches and writes
    [x | h...] itself; its backward reads x once more and writes x's whole gradient, the bases' shares added.

    The first member called computes all the outputs and leaves the others theirs, which they take if their
    x is that x.
    """

    def __init__(self, members, adapter, dtype):
        self.members, self.adapter = members, adapter
        self.p, self.scaling = members[0].lora_dropout[adapter].p, members[0].scaling[adapter]
        bases = [member.base_layer.weight for member in members]
        rank, in_features = members[0].lora_A[adapter].weight.shape
        self.weight = torch.zeros(
            sum(base.shape[0] for base in bases), in_features + len(members) * rank, dtype=dtype, device=bases[0].device
        )
        self.b_blocks, first_row, first_column = [], 0, in_features
        for base in bases:
            rows = slice(first_row, first_row + base.shape[0])
            self.weight[rows, :in_features] = base.detach()
            base.data = self.weight[rows, :in_features]
            self.b_blocks.append(self.weight[rows, first_column : first_column + rank])
            first_row, first_column = rows.stop, first_column + rank
        for member in members:
            member.shared_input, member.shared_output = self, None

    @staticmethod
    def groupable(members, dtype):
        """Whether these linears can share a matmul: one adapter with step inputs and the same LoRA settings,
        no bias, the step's dtype, no more than one kernel call's branches."""
        adapters = {tuple(member.lora_A) for member in members} | {tuple(member.half_copies) for member in members}
        if len(adapters) != 1 or len(adapter := adapters.pop()) != 1 or len(members) > MAX_BRANCHES:
            return False
        settings = {
            (member.lora_A[adapter[0]].weight.shape, member.lora_dropout[adapter[0]].p, member.scaling[adapter[0]])
            for member in members
        }
        return len(settings) == 1 and all(
            member.base_layer.bias is None and member.base_layer.weight.dtype == dtype for member in members
        )

    def __call__(self, member, x):
        shared_output = member.shared_output
        member.shared_output = None
        if shared_output is not None and shared_output[0] is x:
            return shared_output[1]
        lora_as, b_stand_ins = zip(*(other.half_copies[self.adapter] for other in self.members))
        seeds = [other.dropout_seed for other in self.members]
        outputs = _SharedInputLinear.apply(
            x, self.weight, self.p, self.scaling, len(self.members), *lora_as, *seeds, *b_stand_ins
        )
        for other, output in zip(self.members, outputs):
            if other is not member:
                other.shared_output = (x, output)
        return outputs[self.members.index(member)]


class _SharedInputLinear(torch.autograd.Function):
    """[x | h_1 | ... | h_n] times SharedInput's matrix, each member's output apart, the h's from dropout_down_joined;
    the gradients of x, of each A and of each B through its stand-in.

    The outputs are returned apart so that their gradients come back apart: autograd would otherwise join them
    into one tensor first, and for q, k and v (three layouts, RoPE's backward among them) torch.compile's kernel
    for that took 4 ms a step (bench/README.md, tenth pass). The stand-ins (StepInputs' copies of the B's)
    carry no values here, the matrix holds the same ones: they are what the step's gradients for the B's are
    taken with respect to, so that the matrix itself needs none.
    """

    @staticmethod
    def forward(ctx, x, weight, p, scaling, count, *per_member):
        lora_as, seeds, b_stand_ins = (per_member[index * count : (index + 1) * count] for index in range(3))
        joined, h = dropout_down_joined(x, list(lora_as), list(seeds), p, scaling)
        # x is kept rather than [x | h...], which is as large and would be kept besides.
        ctx.save_for_backward(x, weight, h, *lora_as, *seeds)
        ctx.p, ctx.scaling, ctx.count = p, scaling, count
        ctx.widths = [b.shape[0] for b in b_stand_ins]
        return (joined @ weight.t()).unflatten(0, x.shape[:-1]).split(ctx.widths, dim=-1)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, weight, h, *lora_as_and_seeds = ctx.saved_tensors
        lora_as, seeds = lora_as_and_seeds[: ctx.count], lora_as_and_seeds[ctx.count :]
        grad_outputs = [grad_output.flatten(0, -2) for grad_output in grad_outputs]
        bases = [
            grad_output @ weight[first_row : first_row + width]
            for grad_output, first_row, width in zip(grad_outputs, itertools.accumulate([0, *ctx.widths]), ctx.widths)
        ]
        grad_x, *grad_as = dropout_down_joined_backward(x, lora_as, seeds, bases, ctx.p, ctx.scaling)
        grad_bs = [grad_output.t() @ branch for grad_output, branch in zip(grad_outputs, h)]
        return grad_x, None, None, None, None, *grad_as, *[None] * ctx.count, *grad_bs


def use_dropout_kernel(model):
    """Route each LoRA Linear's dropout and down-projection through dropout_down; how many were.

    peft's plain LoRA Linears (no DoRA, no quantized base) that have a dropout and an input
    width the mask's groups of eight divide. For a bf16 GPU, which the kernel computes in.
    """
    routed = 0
    for module in model.modules():
        if type(module) is not LoraLinear or module.lora_variant or module.in_features % MASKS_PER_DRAW:
            continue
        if not any(isinstance(dropout, torch.nn.Dropout) for dropout in module.lora_dropout.values()):
            continue
        module.forward = lora_forward.__get__(module)
        routed += 1
    return routed


class StepInputs:
    """What the routed linears take from the start of each step, made there in two kernels for all of them.

    Their LoRA weights, copied in the dtype the step computes in. Cast inside the step, each took a kernel
    of its own forward, and its gradient another back to float32: a few hundred kernels of about 2 µs per
    step for the 112 linears of the 1B benchmark, whose tokens/s this raised 1.7% (bench/README.md,
    ninth pass). Here one multi-tensor copy refreshes them all,
    the step takes its gradients with respect to the copies (computed_from), and write_gradients copies
    those into the float32 weights' .grad in one more. The same numbers as casting: the copies hold the
    weights cast as autocast casts them. Only for steps whose gradients write_gradients takes: backward()
    would leave them on the copies.

    And their dropout seeds, drawn in one kernel instead of one each.
    """

    def __init__(self, model, dtype, share_inputs=True):
        routed = [module for module in model.modules() if getattr(module.forward, "__func__", None) is lora_forward]
        self.weights, self.copies = [], []
        self.seeds = torch.zeros(len(routed), dtype=torch.int64, device=next(model.parameters()).device)
        for index, module in enumerate(routed):
            module.dropout_seed = self.seeds[index : index + 1]
            # A bias on B (peft's lora_bias) stays on peft's cast path.
            module.half_copies = {
                adapter: tuple(self.copy(layer[adapter].weight, dtype) for layer in (module.lora_A, module.lora_B))
                for adapter in module.lora_A
                if module.lora_B[adapter].bias is None
            }
        # The B's that shared-input matmuls hold, and the weights they are copied from.
        self.b_blocks, self.b_weights = [], []
        for parent in model.modules() if share_inputs else ():
            for names in SHARED_INPUT_NAMES:
                members = [getattr(parent, name, None) for name in names]
                if all(member in routed for member in members) and SharedInput.groupable(members, dtype):
                    group = SharedInput(members, next(iter(members[0].lora_A)), dtype)
                    self.b_blocks += group.b_blocks
                    self.b_weights += [member.lora_B[group.adapter].weight for member in members]

    def copy(self, weight, dtype):
        copy = weight.detach().to(dtype, copy=True).requires_grad_(weight.requires_grad)
        self.weights.append(weight)
        self.copies.append(copy)
        return copy

    @torch.no_grad()
    def refresh(self):
        """Copy the weights' current values (after an optimizer step, or a checkpoint's) and draw new seeds."""
        torch._foreach_copy_(self.copies, self.weights)
        if self.b_blocks:  # views into the shared-input matrices: a copy each
            torch._foreach_copy_(self.b_blocks, self.b_weights)
        self.seeds.random_(2**31 - 1)

    def computed_from(self, parameters):
        """What the step's gradients are taken with respect to, for each of `parameters`: its copy, or itself."""
        stand_ins = {id(weight): copy for weight, copy in zip(self.weights, self.copies)}
        return [stand_ins.get(id(parameter), parameter) for parameter in parameters]
