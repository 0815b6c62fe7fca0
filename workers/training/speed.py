"""What makes the engine fast on a GPU, and how fast it went.

Measured in bench/train_speed.py against transformers.Trainer + peft (bench/README.md):
a bf16 base under frozen methods, padding-free packing (data.py) with flash attention's
variable-length kernel keeping each sequence to itself, torch.compile of the transformer
blocks and of the loss, each step replayed as a CUDA graph (in one process or several),
LoRA's dropout drawn inside a Triton kernel of our own (lora_dropout.py), fused AdamW and,
with Liger Kernel installed, a fused linear + cross-entropy loss that never holds the whole
vocabulary's logits. Each is a default where it pays (compiling only for a job long enough to
repay its minute); an admin can turn one off on a worker if a model trips it
(`TUNEDECK_COMPILE=0`, `TUNEDECK_CUDA_GRAPHS=0`, `TUNEDECK_ATTENTION=flex` or `sdpa`,
`TUNEDECK_LIGER=0`, `TUNEDECK_LORA_KERNEL=0`, `TUNEDECK_SHARED_INPUTS=0`). None of them applies
on a CPU, where the same loop runs in float32, eager.
"""

import inspect
import os

import torch
from accelerate.utils.other import is_repeated_blocks
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

# Dense bf16 tensor-core peaks (FLOP/s) by the name CUDA reports; MFU is null for a GPU not listed.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


# What an admin sets a TUNEDECK_ switch to, to turn that speed-up off on a worker.
OFF_VALUES = ("0", "false", "no", "off")


def turned_off(variable):
    return os.environ.get(variable, "").strip().lower() in OFF_VALUES


def on_bf16_gpu():
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def base_dtype(method_type):
    """The dtype the base weights are loaded in.

    A frozen base needs no float32 master copy: bf16 halves its memory and
    autocast would cast it to bf16 at every step anyway. Full fine-tuning updates
    every weight, so those stay float32 (mixed precision), as do all weights on a CPU.
    """
    if on_bf16_gpu() and method_type != "full":
        return torch.bfloat16
    return torch.float32


def trainable_in_float32(model):
    """Optimizer updates are too small for bf16's 8-bit mantissa: trained weights stay float32, computed in bf16."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def matmul_parameters(model):
    """N of MFU: the weights of every linear layer, the LM head included (4-bit weights counted unpacked)."""
    count = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            weight = module.weight
            count += weight.numel() * (2 * weight.element_size() if type(weight).__name__ == "Params4bit" else 1)
    return count


def flops_per_token(method_type, matmul_params):
    # Forward 2N; backward 2N to the activations, and 2N more to the weights when they all train.
    return (6 if method_type == "full" else 4) * matmul_params


def peak_flops():
    """The current GPU's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for model_name, flops in PEAK_BF16_FLOPS.items():
        if model_name in name:
            return flops
    return None


def mfu(tokens_per_sec, flops_per_token, peak_flops, gpus):
    """Model FLOPs utilisation: the share of the GPUs' bf16 peak the model's matmuls ran at (None without a peak)."""
    return tokens_per_sec * flops_per_token / (peak_flops * gpus) if peak_flops else None


def attend_within_sequences(model):
    """Attention that keeps each packed sequence to itself and computes only within it; returns the kernel's name.

    transformers reads the packing from the position ids either way, but SDPA needs
    the mask as a dense row-by-row matrix and computes every token against every
    other before masking: for a row of eight sequences that is most of the attention's
    work thrown away. Flash attention's variable-length kernel (torch's varlen_attn)
    takes the sequences' boundaries (collate_packed's cu_seq_lens_q) and computes each
    sequence alone; where torch lacks it, a FlexAttention block mask skips the blocks
    across sequences, more slowly. TUNEDECK_ATTENTION=flex or sdpa picks one of those.
    """
    wanted = os.environ.get("TUNEDECK_ATTENTION", "varlen").strip().lower()
    if not torch.cuda.is_available() or wanted == "sdpa":
        return None
    # varlen_attn takes causal attention as window_size since torch 2.11.
    if wanted == "varlen" and "window_size" in VARLEN_PARAMETERS:
        model.set_attn_implementation(VARLEN)
        return "varlen flash attention"
    model.set_attn_implementation("flex_attention")
    return "FlexAttention"


VARLEN = "tunedeck_varlen"


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: FlexAttention then
    varlen_attn = None
VARLEN_PARAMETERS = set(inspect.signature(varlen_attn).parameters) if varlen_attn else set()


def varlen_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, max_length_q=None, **kwargs
):
    """transformers' attention interface over varlen_attn for a packed row; SDPA for anything else (padded eval batches)."""
    # Flash attention computes in half precision only. Autocast does not cast a custom kernel's inputs
    # itself, and full fine-tuning's float32 rotary embeddings hand it float32 queries and keys.
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if cu_seq_lens_q is None or query.shape[0] != 1 or dropout or half not in (torch.float16, torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    # One row: [1, heads, tokens, head_dim] -> [tokens, heads, head_dim]. The bound on its sequences' length
    # (collate_packed's max_length_q, else the row's length) stays the same for all batches of one row
    # length, as a CUDA graph needs.
    query, key, value = (tensor[0].transpose(0, 1).to(half) for tensor in (query, key, value))
    longest = max_length_q or query.shape[0]
    # Fewer key/value heads than query heads (GQA): flash attention shares them itself; newer torch asks for the flag.
    grouped = {"enable_gqa": True} if key.shape[1] != query.shape[1] and "enable_gqa" in VARLEN_PARAMETERS else {}
    output = varlen_attn(
        query, key, value, cu_seq_lens_q, cu_seq_lens_q, longest, longest, scale=scaling, window_size=(-1, 0), **grouped
    )
    return output.unsqueeze(0), None


AttentionInterface.register(VARLEN, varlen_attention)
# The mask transformers builds for the padded batches that fall back to SDPA.
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def use_liger(model, method_type):
    """Liger Kernel's fused linear cross-entropy for the model's family, where it has one.

    The LM head and the loss run chunk by chunk, so the logits of the whole vocabulary
    (128k entries per token for Llama 3) are never held at once. That saves memory
    (10.8 GB instead of 16.5 GB at the peak of the 1B LoRA benchmark) but costs time
    (23,200 instead of 26,300 tokens/s there), so it is the default only for QLoRA,
    the method people choose to fit a model into a smaller GPU. TUNEDECK_LIGER=1 turns
    it on for every method, 0 off. The blocks' norms, RoPE and SwiGLU are left to
    torch.compile, which fuses them itself.
    """
    wanted = os.environ.get("TUNEDECK_LIGER", "").strip().lower()
    if not torch.cuda.is_available() or wanted in OFF_VALUES:
        return False
    if method_type != "qlora" and wanted not in ("1", "true", "yes", "on"):
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=model, fused_linear_cross_entropy=True, cross_entropy=False, rope=False, rms_norm=False, swiglu=False
    )
    return True


def step_inputs(model, lora_dropout_kernel):
    """What the dropout kernel's linears take from the start of each step (lora_dropout.StepInputs), or None."""
    if not lora_dropout_kernel:
        return None
    from workers.training import lora_dropout

    # TUNEDECK_SHARED_INPUTS=0: each linear its own matmul and B product (lora_dropout.SharedInput), as before.
    return lora_dropout.StepInputs(model, torch.bfloat16, share_inputs=not turned_off("TUNEDECK_SHARED_INPUTS"))


def use_lora_dropout_kernel(model):
    """LoRA's dropout and down-projection in one Triton kernel (lora_dropout.py); how many linears use it."""
    if not on_bf16_gpu() or turned_off("TUNEDECK_LORA_KERNEL"):
        return 0
    from workers.training import lora_dropout  # Triton: GPU workers have it, a CPU-only install need not

    return lora_dropout.use_dropout_kernel(model)


# What compiling costs and saves, measured on an H100 with the 1B LoRA benchmark (bench/README.md): its
# first step takes 61-94 s (the compile cache warm or cold) instead of 4 s eagerly, and then each step
# 38 ms instead of 59, 1.7 times the step's FLOPs at the GPU's dense peak.
COMPILE_SECONDS = 90
COMPILE_SAVES_PEAK_TIMES = 1.7


def compile_repays(flops_per_step, steps, peak_flops):
    """Whether a job of `steps` steps of `flops_per_step` saves more time compiled than compiling takes.

    Where the GPU's peak is unknown, yes: compiling was the only choice before this estimate.
    """
    if peak_flops is None:
        return True
    return steps * COMPILE_SAVES_PEAK_TIMES * flops_per_step / peak_flops > COMPILE_SECONDS


def compile_in_place(model, flops_per_step, steps):
    """torch.compile each transformer block in place, where it pays; says what it did (None on a CPU or turned off).

    A few fused kernels per block instead of hundreds of small ones. Regional compilation
    (https://pytorch.org/tutorials/recipes/regional_compilation.html): the blocks of a model
    share their code, so one block is compiled and the others reuse it, in seconds where the
    whole model takes minutes. In place (nn.Module.compile), so state dicts, peft and accelerate
    see the same modules. Shapes are dynamic from the start: packed rows change length from
    step to step. Compiling takes a minute or more before the first step, which a short job
    never earns back: by default ("auto") the job compiles only when compile_repays.
    TUNEDECK_COMPILE=default (or 1) compiles every job, another value names torch's compile
    mode ("max-autotune-no-cudagraphs", ...), and 0 trains eagerly.
    """
    mode = os.environ.get("TUNEDECK_COMPILE", "auto").strip().lower()
    if not torch.cuda.is_available() or mode in OFF_VALUES:
        return None
    if mode == "auto" and not compile_repays(flops_per_step, steps, peak_flops()):
        return f"not compiled: {steps} steps would not repay compiling"
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(mode=None if mode in ("1", "default", "auto") else mode, dynamic=True)
    # The loss too: compiled, it reads the bf16 logits once, instead of first writing a float32 copy of them
    # (128k entries per token for Llama 3) and then reading that through softmax, forward and backward.
    transformers_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    transformers_model.loss_function = torch.compile(transformers_model.loss_function, dynamic=True)
    return "compiled" if blocks else None


def transformer_blocks(model):
    """The model's repeated blocks (its decoder or encoder layers), in order."""
    return [block for module in model.modules() if is_repeated_blocks(module) for block in module]


def use_cuda_graphs(model, packs, fused_loss):
    """Whether the steps can run as CUDA graphs (GraphedSteps): TUNEDECK_CUDA_GRAPHS=0 turns them off.

    Only for packed rows, whose few lengths make few graphs (padded batches come in every
    shape), and where nothing in the step waits on the GPU from Python: gradient
    checkpointing saves and restores RNG states, and Liger's fused loss reads its token
    count back, neither of which a graph can hold.
    """
    if turned_off("TUNEDECK_CUDA_GRAPHS"):
        return False
    if not (torch.cuda.is_available() and packs) or fused_loss:
        return False
    return not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def graph_key(batch):
    """What tells a batch's graph from the others': the shapes of its tensors."""
    return tuple(tuple(value.shape) for value in batch.values() if torch.is_tensor(value))


class GraphedSteps:
    """A step's forward and backward replayed as one CUDA graph, one graph per packed row length.

    Compiled, the 1B LoRA step of the benchmark still launched its few thousand kernels one
    by one from Python, and the GPU waited on those launches for most of a 75 ms step; a graph
    launches them all at once. A graph holds fixed shapes, and packed rows come in few lengths
    (multiples of 256), so each length gets its own: its first batch runs as usual (compiling
    and warming the kernels for that shape), its second is captured, later ones replay. The
    graphs share one memory pool and keep their inputs, gradients and loss in buffers held
    here; the loop copies each replay's loss out before the next replay. The optimizer step stays outside,
    a single fused kernel, so the learning-rate schedule, checkpoints and resuming see an
    ordinary optimizer. The gradients stay allocated between steps, since a graph writes them
    where its capture found them: in one buffer, which several processes average in one
    all-reduce after each step, in place of DDP's hooks. The step writes them whole
    (write_gradients), so nothing needs zeroing between steps.
    """

    def __init__(self, forward_backward, parameters, log):
        self.forward_backward, self.log = forward_backward, log
        # One dtype: trained weights are float32 (trainable_in_float32).
        self.gradients = torch.zeros(sum(p.numel() for p in parameters), dtype=parameters[0].dtype, device="cuda")
        offset = 0
        for parameter in parameters:
            parameter.grad = self.gradients[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.processes = torch.distributed.get_world_size() if distributed else 1
        if self.processes > 1:  # as DDP would: every process starts from the first one's weights
            for parameter in parameters:
                torch.distributed.broadcast(parameter.data, src=0)
        self.loss = torch.zeros((), device="cuda")
        self.stream = torch.cuda.Stream()  # warm-up and capture both on one side stream, as torch's docs do
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs = {}  # the inputs' shapes -> (graph, its input buffers)
        self.seen = set()
        self.failed = False

    def __call__(self, batch):
        loss = self.replay_or_run(batch)
        if self.processes > 1:
            torch.distributed.all_reduce(self.gradients, op=torch.distributed.ReduceOp.AVG)
        return loss

    def replay_or_run(self, batch):
        shape = graph_key(batch)
        if shape in self.graphs:
            graph, inputs = self.graphs[shape]
            for name, buffer in inputs.items():
                buffer.copy_(batch[name])
            graph.replay()
            return self.loss
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if shape in self.seen and not self.failed and self.capture(shape, batch):
                self.graphs[shape][0].replay()
                loss = self.loss
            else:
                self.seen.add(shape)
                loss = self.forward_backward(batch)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss

    def capture(self, shape, batch):
        """Record the step for this shape (nothing runs yet); False where the step cannot be recorded."""
        inputs = {name: value.clone() for name, value in batch.items() if torch.is_tensor(value)}
        graph = torch.cuda.CUDAGraph()
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        random_state = generator.clone_state()
        try:
            # thread_local: the CUDA calls of other threads (NCCL's watchdog) go on during a capture.
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                self.loss.copy_(self.forward_backward(batch | inputs))
        except RuntimeError as error:
            # Something in this model's step waits on the GPU: the run goes on as it would without graphs.
            # A failed capture leaves the GPU's random generator expecting a graph; it gets its state back.
            generator.graphsafe_set_state(random_state)
            self.failed = True
            self.log(f"CUDA graphs off for this run, a step could not be captured: {str(error).splitlines()[0]}")
            return False
        self.graphs[shape] = (graph, inputs)
        return True


def write_gradients(loss, parameters, computed_from=None):
    """Write the loss's gradients into the parameters' .grad (GraphedSteps' buffer) with one multi-tensor copy.

    Autograd's backward() would add each into its .grad with a kernel of its own: 224 additions of a
    few microseconds each per step of the 1B LoRA benchmark (bench/README.md). `computed_from` names,
    for each parameter, the tensor the step computed with in its place (lora_dropout.StepInputs).
    """
    gradients = torch.autograd.grad(loss, computed_from or parameters, materialize_grads=True)
    torch._foreach_copy_([parameter.grad for parameter in parameters], gradients)


class HostCopy:
    """A GPU tensor's copy to the CPU, queued now; tolist() waits for the copy alone, not for work queued after it.

    Reading a GPU tensor (.tolist(), .item()) queues its copy behind everything launched so far;
    the loop reads a step's loss after it has launched the next step, which must not be waited for.
    """

    def __init__(self, tensor):
        self.copy = tensor.to("cpu", non_blocking=True)  # into pinned memory, which a copy needs to run queued
        self.copied = None
        if tensor.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def tolist(self):
        if self.copied is not None:
            self.copied.synchronize()
        return self.copy.tolist()
