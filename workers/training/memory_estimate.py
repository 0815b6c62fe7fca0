"""How much memory a job will need at its peak, worked out before it is queued.

Plain arithmetic over the model's sizes (catalogue.describe_model) and the job's
spec, mirroring what the engine does (speed.py): on a GPU a frozen base in bf16
(QLoRA: its linear layers in 4 or 8 bits, the rest in bf16), full fine-tuning's
weights in float32 under bf16 autocast, float32 everywhere on a CPU; trainable
weights in float32 with AdamW's two moments, activations for a batch whose rows
all reach max_seq_length (the most a batch, packed or padded, can hold), and the
float32 logits of the loss (not for QLoRA on a GPU, whose fused loss never holds them). The GPU figure is
what torch allocates (torch.cuda.max_memory_allocated, as the job page reports
it); `fits` adds the CUDA context and allocator slack on top.

The activation and logit constants (bytes per token) are fitted to the peaks of
real runs on an H100; bench/memory_estimate.py re-measures them.
"""

from dataclasses import dataclass

from workers.training.presets import TARGET_MODULE_PRESETS, matches

MB = 2**20
HEADS = ("lm_head", "classifier", "score", "pooler")

# Bytes per token that the activations and the loss keep, fitted by least squares (relative error)
# to the peaks of 14 runs on an H100 (two Llama shapes, every method; bench/memory_estimate.py and
# bench/README.md): per decoder layer, per unit of hidden and FFN width; per vocabulary entry for
# the logits, their float32 copy for the loss, log-softmax and its gradient. The two shapes had
# FFN = 4 x hidden, so the split between the first two is loose; their sum is what was measured.
# The CPU figures are rougher: float32 throughout, no autocast copies, not fitted.
ACTIVATION_BYTES_PER_HIDDEN = {"cuda": 2.4, "cpu": 8}
ACTIVATION_BYTES_PER_FFN = {"cuda": 9.8, "cpu": 20}
LOGIT_BYTES_PER_VOCAB = {"cuda": 12.8, "cpu": 12}
# QLoRA on a GPU computes its loss with Liger Kernel's fused linear cross-entropy (speed.use_liger; GPU
# workers install Liger with the gpu extra) for the model types Liger patches. It makes the logits a
# chunk of tokens at a time and never holds them whole. What the step holds for it instead (the
# input's gradient, a chunk's logits) and beyond the other parts, per token and hidden unit, fitted to
# three QLoRA runs on an H100 whose every row was max_seq_length long (bench/README.md).
FUSED_LOSS_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo2"}
FUSED_LOSS_BYTES_PER_HIDDEN = 60
# peft's LoRA dropout keeps its output per targeted layer, per token and input feature.
LORA_DROPOUT_BYTES_PER_INPUT = 2.3
# With gradient checkpointing (asked for, or QLoRA's), a layer keeps only its input until it is recomputed.
CHECKPOINTED_BYTES_PER_HIDDEN = 0.9
# bitsandbytes: a 4-bit weight is half a byte plus its block's scale (float32 per 64 weights,
# or 8 bits per 64 with a float32 per 256 blocks when the scales are quantized too).
QUANTIZED_BYTES_PER_WEIGHT = {(4, False): 0.5 + 4 / 64, (4, True): 0.5 + 1 / 64 + 4 / (64 * 256), (8, False): 1 + 4 / 4096}
# The CPU figure is the trainer's resident size: Python, torch and transformers come with it.
CPU_PROCESS_BASELINE_MB = 500
# Between torch's allocations and what the card must have: the CUDA context and the caching allocator's slack.
GPU_CONTEXT_MB = 1024
GPU_SLACK = 1.15

STANDARD_GPU_SIZES_GB = (8, 16, 24, 40, 48, 80, 141)
# What FSDP splits across the GPUs.
SHARDED_PARTS = ("base weights", "trainable weights")


@dataclass
class MemoryEstimate:
    device: str
    parts_mb: dict  # what takes the memory, in MB, largest first

    @property
    def total_mb(self):
        return round(sum(self.parts_mb.values()))

    def needed_on_card_mb(self):
        """Memory the device must have for this job to run: the estimate plus context and slack."""
        if self.device == "cuda":
            return round(self.total_mb * GPU_SLACK + GPU_CONTEXT_MB)
        return self.total_mb

    def fits(self, capacity_mb):
        return capacity_mb is not None and self.needed_on_card_mb() <= capacity_mb

    def smallest_standard_gpu_gb(self):
        return next((size for size in STANDARD_GPU_SIZES_GB if self.fits(size * 1024)), None)


def estimate_peak_memory(info, spec, device="cuda", shards=1):
    """MemoryEstimate for training `spec` (a jobs.spec.JobSpec) on `device` ("cuda" or "cpu"), per GPU.

    `info` is the base model's architecture_info; a model described before the
    shapes were recorded gives None (no estimate rather than a wrong one).
    `shards` > 1: weights, gradients and optimizer state split across that many GPUs
    (FSDP, sharding.py), each GPU also holding weights gathered whole (two blocks': the
    one computing and the next, prefetched; and the head) in place of autocast's bf16 copies.
    """
    if not info or "linear_shapes" not in info:
        return None
    method = spec.method
    hp = spec.hyperparameters
    hidden, ffn = info["hidden_size"], info.get("intermediate_size") or 4 * info["hidden_size"]
    layers = info["num_layers"]
    causal_lm = spec.task == "causal_lm_sft"
    backbone = info["parameters"]
    head = info["vocab_size"] * hidden if causal_lm and not info["tied_embeddings"] else 0
    layer_linears = {name: shape for name, shape in info["linear_shapes"].items() if not name.startswith(HEADS)}
    linear_weights = sum(inputs * outputs * count for inputs, outputs, count in layer_linears.values())
    if causal_lm:
        head_linear_weights = info["vocab_size"] * hidden  # the LM head, tied or not, is a matmul
    else:
        head_linear_weights = 0

    # --- weights of the frozen base ---
    parts = {}
    bf16_base = device == "cuda" and method.type != "full"
    if method.type == "qlora":
        quantized = QUANTIZED_BYTES_PER_WEIGHT[(method.bits, method.double_quant and method.bits == 4)]
        parts["base weights (quantized)"] = linear_weights * quantized
        parts["base weights (bf16 rest)" if bf16_base else "base weights (float32 rest)"] = (
            (backbone + head - linear_weights) * (2 if bf16_base else 4)
        )
    else:
        parts["base weights (bf16)" if bf16_base else "base weights"] = (backbone + head) * (2 if bf16_base else 4)
    if device == "cuda" and method.type == "full":
        # bf16 copies of the float32 linear weights, made by autocast and kept for the backward pass.
        parts["bf16 weight copies"] = (linear_weights + head_linear_weights) * 2

    # --- trainable weights, their gradients and AdamW's two moments, all float32 ---
    trainable = trainable_parameters(info, spec)
    new_weight_bytes = 0 if method.type == "full" else 4
    parts["trainable weights, gradients, optimizer"] = trainable * (new_weight_bytes + 4 + 8)

    # --- activations of one batch padded to max_seq_length ---
    sequence = hp.max_seq_length + (method.num_virtual_tokens if method.type == "prompt" else 0)
    tokens = hp.batch_size * sequence
    per_token_layer = ACTIVATION_BYTES_PER_HIDDEN[device] * hidden + ACTIVATION_BYTES_PER_FFN[device] * ffn
    if method.type in ("lora", "dora", "qlora") and method.dropout > 0:
        per_token_layer += LORA_DROPOUT_BYTES_PER_INPUT * sum(
            inputs * count for inputs, _, count in targeted(layer_linears, info, method.target_modules).values()
        ) / layers
    if method.type == "qlora" or hp.gradient_checkpointing:  # one layer's activations live, the others' inputs kept
        activations = tokens * (layers * CHECKPOINTED_BYTES_PER_HIDDEN * hidden + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    if method.type == "dora":
        # DoRA builds each adapted layer's full updated weight to take its norm, in float32.
        activations += 4 * sum(i * o * c for i, o, c in targeted(layer_linears, info, method.target_modules).values())
    parts["activations"] = activations
    if causal_lm and device == "cuda" and method.type == "qlora" and info.get("model_type") in FUSED_LOSS_MODEL_TYPES:
        parts["loss (fused, the logits never whole)"] = tokens * hidden * FUSED_LOSS_BYTES_PER_HIDDEN
    elif causal_lm:
        parts["logits and loss"] = tokens * info["vocab_size"] * LOGIT_BYTES_PER_VOCAB[device]
    if device == "cpu":
        parts["Python, torch and libraries"] = CPU_PROCESS_BASELINE_MB * MB

    if shards > 1:
        sharded = {name: size / shards for name, size in parts.items() if name.startswith(SHARDED_PARTS)}
        parts = {name: size for name, size in parts.items() if not name.startswith(SHARDED_PARTS + ("bf16 weight copies",))}
        parts |= {f"{name}, 1/{shards} each": size for name, size in sharded.items()}
        # The root's weights (embeddings, head) stay gathered from the forward to the end of the backward.
        parts["weights gathered whole"] = (2 * linear_weights / layers + head_linear_weights) * (2 if device == "cuda" else 4)
    parts_mb = {name: size / MB for name, size in sorted(parts.items(), key=lambda item: -item[1])}
    return MemoryEstimate(device=device, parts_mb=parts_mb)


def targeted(layer_linears, info, target_modules):
    """The linear layer patterns a LoRA-style target list or preset selects."""
    if isinstance(target_modules, str):
        suffixes = TARGET_MODULE_PRESETS.get(info.get("family"), {}).get(target_modules, [])
    else:
        suffixes = target_modules
    return {
        name: shape for name, shape in layer_linears.items() if any(matches(name, suffix) for suffix in suffixes)
    }


def trainable_parameters(info, spec):
    method = spec.method
    hidden, layers = info["hidden_size"], info["num_layers"]
    layer_linears = {name: shape for name, shape in info["linear_shapes"].items() if not name.startswith(HEADS)}
    if method.type == "full":
        head = info["vocab_size"] * hidden if spec.task == "causal_lm_sft" and not info["tied_embeddings"] else 0
        return info["parameters"] + head
    if method.type in ("lora", "dora", "qlora"):
        chosen = targeted(layer_linears, info, method.target_modules)
        count = sum(method.r * (inputs + outputs) * layers_ for inputs, outputs, layers_ in chosen.values())
        if method.type == "dora":
            count += sum(outputs * layers_ for _, outputs, layers_ in chosen.values())
    elif method.type == "adapter":
        bottleneck = method.bottleneck_size or max(1, hidden // method.reduction_factor)
        per_layer = 2 if method.placement == "houlsby" else 1
        count = layers * per_layer * (2 * hidden * bottleneck + bottleneck + hidden)
    elif method.type == "ia3":
        count = layers * (2 * hidden + (info.get("intermediate_size") or 4 * hidden))
    elif method.type == "prefix":
        count = method.num_virtual_tokens * layers * 2 * hidden
    else:  # prompt tuning
        count = method.num_virtual_tokens * hidden
    if spec.task == "sequence_classification":
        count += hidden * 2  # the new classifier head, a few labels wide, trains in full
    return count
