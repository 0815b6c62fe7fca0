"""Fine-tuning methods, one module each, registered by the `type` of the JobSpec method section.

A method module exposes `apply(model, config, task, architecture)`, which returns
the model ready to train (only the method's parameters left trainable), and a
model whose `save_pretrained` writes the method's artifact in safetensors + JSON.
"""

from workers.training.methods import lora

METHODS = {"lora": lora}
