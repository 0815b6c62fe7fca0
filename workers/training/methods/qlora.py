"""QLoRA: the frozen base quantized by bitsandbytes (4-bit NF4/FP4, or 8-bit), LoRA trained on top.

The memory saver: the base weights take a quarter (4-bit) or half (8-bit) of
their bf16 size, and only the small LoRA matrices get gradients and optimizer state.
"""

import copy

import peft
import torch
from transformers import BitsAndBytesConfig

from workers.training.methods import lora
from workers.training.methods.lora import save  # noqa: F401 (the interface)
from workers.training.modeling import load_model

# The new classifier head of a sequence classification model trains in full, so it must
# stay unquantized. (transformers keeps the last module unquantized by itself, but judges
# that by the last parameter's name, and a head with a bias escapes it.)
CLASSIFIER_HEADS = ["classifier", "score"]  # BERT-style, Llama-style


def full_precision_dtype(on_gpu):
    """The dtype the quantized layers compute in, and the merged model is written in."""
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def base_model_kwargs(config, task, on_gpu):
    # None leaves transformers its own choice: the LM head (the output embeddings) stays unquantized.
    skip_modules = CLASSIFIER_HEADS if task == "sequence_classification" else None
    if config.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quant_type,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=full_precision_dtype(on_gpu),
            llm_int8_skip_modules=skip_modules,
        )
    kwargs = {"quantization_config": quantization}
    if on_gpu:
        # A quantized model cannot be moved once loaded, so it is loaded straight onto this process's GPU.
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def apply(model, config, task, family):
    # Gradient checkpointing always: once the weights are 4-bit, the activations are what is
    # left to save memory on. (Non-reentrant, the variant torch recommends, which needs no
    # input hooks.) Unlike peft's prepare_model_for_kbit_training, the unquantized layers
    # (norms, embeddings, head) are not copied to float32: they are frozen, the norms compute
    # in float32 anyway, and on an 8B model those copies alone would take 4 GB.
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_one_weight_layout(model)
    return lora.apply(model, config, task, family)


def load(base_model, directory):
    keep_one_weight_layout(base_model)
    return lora.load(base_model, directory)


def keep_one_weight_layout(model):
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPUs.

    It repacks on the first eval forward, and every state_dict() (each checkpoint and the
    artifact) unpacks them again with re-quantized scales: the frozen base would drift a
    little at every save, and a resumed run would not match. The packed layout also computes
    differently, so a reloaded adapter must keep the same layout to give the same outputs.
    GPUs never take that path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def merge(model, run):
    """Fold the trained LoRA into a full-precision copy of the base, reloaded unquantized from the model path.

    Merging into the quantized weights themselves would round the update into
    the 4-bit grid and lose most of it. `model` is left as it was.
    """
    device = next(model.parameters()).device
    label_names = None
    if run.spec.task == "sequence_classification":
        label_names = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    dtype = full_precision_dtype(device.type == "cuda")
    base = load_model(run, label_names, model.config.pad_token_id, dtype=dtype).to(device)
    lora_config = copy.deepcopy(model.peft_config["default"])
    lora_config.base_model_name_or_path = base.name_or_path  # the copy's base, as peft would set it (and warn)
    full_precision = peft.get_peft_model(base, lora_config)
    trained = peft.get_peft_model_state_dict(model, save_embedding_layers=False)  # as save() writes it
    peft.set_peft_model_state_dict(full_precision, trained)
    return full_precision.merge_and_unload()
