"""Fine-tuning methods, one module each, registered by the `type` of the JobSpec method section.

Like peft's tuners/, a method is its config (in jobs/spec.py) plus a module here exposing:

    apply(model, config, task, family) -> model
        The model ready to train, only the method's parameters left trainable.
        `family` is modeling.architecture_family(model): "llama", "bert" or None.
    save(model, directory, base_model_name, label_names) -> None
        Write the artifact into `directory`: safetensors and JSON only.
    load(base_model, directory) -> model
        The base model (loaded with base_model_kwargs, if any) with a saved artifact applied.
    base_model_kwargs(config, task, on_gpu) -> dict      (optional)
        Extra from_pretrained arguments for the base model (QLoRA's quantization).
    merge(model, run) -> model                           (only where the method can merge)
        A plain transformers model with the trained method folded into its weights, on the
        same device. May spend `model` (peft merges in place); `run` (a TrainingRun) is there
        for methods that rebuild the base from run.model_path (QLoRA merges into an unquantized copy).
    CANNOT_MERGE = "why"                                 (where it cannot)
        A sentence for the user, shown when a merged export is asked for.
    PACKS_SEQUENCES = False                              (where rows must hold one sequence each)
        Causal LM training packs a batch's sequences into one row unless the method says so.
"""

from workers.training.methods import adapter, dora, full, ia3, lora, prefix, prompt, qlora

METHODS = {
    "lora": lora,
    "qlora": qlora,
    "dora": dora,
    "ia3": ia3,
    "prefix": prefix,
    "prompt": prompt,
    "adapter": adapter,
    "full": full,
}
