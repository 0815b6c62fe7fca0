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
the same weights.

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


@triton.jit
def _kept(seed, rows, first_column, columns, drop_below, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """Which of a block's inputs dropout keeps: a function of (seed, row, column) alone, whatever the blocks."""
    groups = first_column // 8 + tl.arange(0, BLOCK_COLUMNS // 8)
    offsets = rows[:, None] * (columns // 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offsets)
    low = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
    high = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
    draws = tl.reshape(tl.join(low, high), (BLOCK_ROWS, BLOCK_COLUMNS))
    return draws.to(tl.int32) >= drop_below


@triton.jit
def _forward_kernel(
    x_ptr, a_ptr, h_parts_ptr, seed_ptr, rows_count, columns, x_row_stride, drop_below, keep_scale,
    RANK: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
    COLUMNS_PER_PROGRAM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    part = tl.program_id(1)
    ranks = tl.arange(0, RANK_BLOCK)
    seed = tl.load(seed_ptr)
    h = tl.zeros((BLOCK_ROWS, RANK_BLOCK), dtype=tl.float32)
    for first_column in range(part * COLUMNS_PER_PROGRAM, (part + 1) * COLUMNS_PER_PROGRAM, BLOCK_COLUMNS):
        cols = first_column + tl.arange(0, BLOCK_COLUMNS)
        inside = (rows[:, None] < rows_count) & (cols[None, :] < columns)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
        kept = _kept(seed, rows, first_column, columns, drop_below, BLOCK_ROWS, BLOCK_COLUMNS)
        x = tl.where(kept, x, tl.zeros_like(x))
        a = tl.load(a_ptr + ranks[None, :] * columns + cols[:, None], mask=(ranks[None, :] < RANK) & (cols[:, None] < columns), other=0.0)
        h += tl.dot(x, a)
    tl.store(h_parts_ptr + part * rows_count * RANK + rows[:, None] * RANK + ranks[None, :], h * keep_scale,
             mask=(rows[:, None] < rows_count) & (ranks[None, :] < RANK))


@triton.jit
def _backward_kernel(
    x_ptr, a_ptr, grad_h_ptr, grad_x_ptr, grad_a_parts_ptr, seed_ptr, rows_count, columns, x_row_stride,
    drop_below, keep_scale,
    RANK: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    part = tl.program_id(1)
    ranks = tl.arange(0, RANK_BLOCK)
    seed = tl.load(seed_ptr)
    a = tl.load(a_ptr + ranks[:, None] * columns + cols[None, :], mask=(ranks[:, None] < RANK) & (cols[None, :] < columns), other=0.0)
    grad_a = tl.zeros((RANK_BLOCK, BLOCK_COLUMNS), dtype=tl.float32)
    for block in range(BLOCKS_PER_PROGRAM):
        rows = (part * BLOCKS_PER_PROGRAM + block) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        inside = (rows[:, None] < rows_count) & (cols[None, :] < columns)
        kept = _kept(seed, rows, tl.program_id(0) * BLOCK_COLUMNS, columns, drop_below, BLOCK_ROWS, BLOCK_COLUMNS)
        grad_h = tl.load(grad_h_ptr + rows[:, None] * RANK + ranks[None, :], mask=(rows[:, None] < rows_count) & (ranks[None, :] < RANK), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
        x = tl.where(kept, x, tl.zeros_like(x))
        grad_a += tl.dot(tl.trans(grad_h), x)
        grad_x = tl.where(kept, tl.dot(grad_h, a) * keep_scale, 0.0)
        tl.store(grad_x_ptr + rows[:, None] * columns + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_a_parts_ptr + part * RANK * columns + ranks[:, None] * columns + cols[None, :], grad_a * keep_scale,
             mask=(ranks[:, None] < RANK) & (cols[None, :] < columns))


def _drop_below(p):
    return round(p * DROP_RESOLUTION)


def _rank_block(rank):
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest side


@triton_op("tunedeck::lora_dropout_down", mutates_args=())
def dropout_down(
    x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, p: float, scaling: float
) -> torch.Tensor:
    """dropout(x, p) @ lora_a.T * scaling, the mask drawn from `seed` (a one-element int64 tensor on x's device)."""
    rows = x.reshape(-1, x.shape[-1])
    rank, columns = lora_a.shape
    # Each program sums over its share of the width; the shares are added after, in a fixed order (no atomics).
    h_parts = torch.empty((triton.cdiv(columns, COLUMNS_PER_PROGRAM), rows.shape[0], rank), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows.shape[0], ROWS_PER_BLOCK), h_parts.shape[0])
    wrap_triton(_forward_kernel)[grid](
        rows, lora_a, h_parts, seed, rows.shape[0], columns, rows.stride(0), _drop_below(p), scaling / (1 - p),
        RANK=rank, RANK_BLOCK=_rank_block(rank), BLOCK_ROWS=ROWS_PER_BLOCK, BLOCK_COLUMNS=COLUMNS_PER_BLOCK,
        COLUMNS_PER_PROGRAM=COLUMNS_PER_PROGRAM, num_warps=FORWARD_WARPS, num_stages=FORWARD_STAGES,
    )
    return h_parts.sum(0).to(x.dtype).view(*x.shape[:-1], rank)


@triton_op("tunedeck::lora_dropout_down_backward", mutates_args=())
def dropout_down_backward(
    x: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor, grad_h: torch.Tensor, p: float, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    grad_h = grad_h.reshape(-1, grad_h.shape[-1]).contiguous()
    rank, columns = lora_a.shape
    parts = triton.cdiv(rows.shape[0], BACKWARD_ROWS_PER_BLOCK * BACKWARD_BLOCKS_PER_PROGRAM)
    grad_x = torch.empty((rows.shape[0], columns), dtype=x.dtype, device=x.device)
    # As in the forward, A's gradient is summed in parts, one per program's rows.
    grad_a_parts = torch.empty((parts, rank, columns), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(columns, BACKWARD_COLUMNS_PER_BLOCK), parts)
    wrap_triton(_backward_kernel)[grid](
        rows, lora_a, grad_h, grad_x, grad_a_parts, seed, rows.shape[0], columns, rows.stride(0),
        _drop_below(p), scaling / (1 - p),
        RANK=rank, RANK_BLOCK=_rank_block(rank), BLOCK_ROWS=BACKWARD_ROWS_PER_BLOCK,
        BLOCK_COLUMNS=BACKWARD_COLUMNS_PER_BLOCK, BLOCKS_PER_PROGRAM=BACKWARD_BLOCKS_PER_PROGRAM,
        num_warps=BACKWARD_WARPS, num_stages=BACKWARD_STAGES,
    )
    return grad_x.view(x.shape), grad_a_parts.sum(0).to(lora_a.dtype)


def _setup_context(ctx, inputs, output):
    x, lora_a, seed, p, scaling = inputs
    ctx.save_for_backward(x, lora_a, seed)
    ctx.p, ctx.scaling = p, scaling


def _backward(ctx, grad_h):
    x, lora_a, seed = ctx.saved_tensors
    grad_x, grad_a = dropout_down_backward(x, lora_a, seed, grad_h, ctx.p, ctx.scaling)
    return grad_x, grad_a, None, None, None


dropout_down.register_autograd(_backward, setup_context=_setup_context)


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
    start of each step.

    The first member called computes all the outputs and leaves the others theirs, which they take if their
    x is that x.
    """

    def __init__(self, members, adapter, dtype):
        self.members, self.adapter = members, adapter
        bases = [member.base_layer.weight for member in members]
        ranks = [member.lora_A[adapter].weight.shape[0] for member in members]
        in_features = members[0].in_features
        self.weight = torch.zeros(
            sum(base.shape[0] for base in bases), in_features + sum(ranks), dtype=dtype, device=bases[0].device
        )
        self.b_blocks, first_row, first_column = [], 0, in_features
        for base, rank in zip(bases, ranks):
            rows = slice(first_row, first_row + base.shape[0])
            self.weight[rows, :in_features] = base.detach()
            base.data = self.weight[rows, :in_features]
            self.b_blocks.append(self.weight[rows, first_column : first_column + rank])
            first_row, first_column = rows.stop, first_column + rank
        for member in members:
            member.shared_input, member.shared_output = self, None

    @staticmethod
    def groupable(members, dtype):
        """Whether these linears can share a matmul: one adapter with step inputs, no bias, the step's dtype."""
        adapters = {tuple(member.lora_A) for member in members} | {tuple(member.half_copies) for member in members}
        return (
            len(adapters) == 1 and len(adapters.pop()) == 1
            and len({member.in_features for member in members}) == 1
            and all(member.base_layer.bias is None and member.base_layer.weight.dtype == dtype for member in members)
        )

    def __call__(self, member, x):
        shared_output = member.shared_output
        member.shared_output = None
        if shared_output is not None and shared_output[0] is x:
            return shared_output[1]
        branches, b_stand_ins = [], []
        for other in self.members:
            lora_a, lora_b = other.half_copies[self.adapter]
            p, scaling = other.lora_dropout[self.adapter].p, other.scaling[self.adapter]
            branches.append(dropout_down(x, lora_a, other.dropout_seed, p, scaling))
            b_stand_ins.append(lora_b)
        outputs = _SharedInputLinear.apply(x, self.weight, len(branches), *branches, *b_stand_ins)
        for other, output in zip(self.members, outputs):
            if other is not member:
                other.shared_output = (x, output)
        return outputs[self.members.index(member)]


class _SharedInputLinear(torch.autograd.Function):
    """[x | h_1 | ... | h_n] times SharedInput's matrix, each member's output apart; the gradients of x and the h's,
    and of each B through its stand-in.

    The outputs are returned apart so that their gradients come back apart: autograd would otherwise join them
    into one tensor first, and for q, k and v (three layouts, RoPE's backward among them) torch.compile's kernel
    for that took 4 ms a step (bench/README.md, tenth pass). The stand-ins (StepInputs' copies of the B's)
    carry no values here, the matrix holds the same ones: they are what the step's gradients for the B's are
    taken with respect to, so that the matrix itself needs none.
    """

    @staticmethod
    def forward(ctx, x, weight, count, *branches_and_b_stand_ins):
        branches, b_stand_ins = branches_and_b_stand_ins[:count], branches_and_b_stand_ins[count:]
        # Only the h's are kept for the backward (B's gradients), not [x | h...]: x is kept by the dropout kernel already.
        ctx.save_for_backward(weight, *branches)
        ctx.widths, ctx.ranks = [b.shape[0] for b in b_stand_ins], [b.shape[1] for b in b_stand_ins]
        return (torch.cat([x, *branches], dim=-1) @ weight.t()).split(ctx.widths, dim=-1)

    @staticmethod
    def backward(ctx, *grad_outputs):
        weight, *branches = ctx.saved_tensors
        grad_inputs = sum(
            grad_output @ weight[first_row : first_row + width]
            for grad_output, first_row, width in zip(grad_outputs, itertools.accumulate([0, *ctx.widths]), ctx.widths)
        )
        grad_x, *grad_branches = grad_inputs.split([weight.shape[1] - sum(ctx.ranks), *ctx.ranks], dim=-1)
        grad_bs = [
            grad_output.flatten(0, -2).t() @ branch.flatten(0, -2) for grad_output, branch in zip(grad_outputs, branches)
        ]
        return grad_x, None, None, *grad_branches, *grad_bs


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
