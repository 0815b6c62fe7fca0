"""Preset names of target modules, per architecture family: plain data, read by the methods and the memory estimate."""

# Preset -> module-name suffixes, per architecture family (see modeling.FAMILY_MARKERS).
TARGET_MODULE_PRESETS = {
    "llama": {
        "attention_qv": ["q_proj", "v_proj"],
        "attention_qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "bert": {
        "attention_qv": ["query", "value"],
        "attention_qkvo": ["query", "key", "value", "attention.output.dense"],
        # "output.dense" is the FFN's down projection (and also matches the attention output).
        "all_linear": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    },
}


def matches(module_name, suffix):
    return module_name == suffix or module_name.endswith("." + suffix)
