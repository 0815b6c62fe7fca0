"""Padding-free packing and the bf16 base: the GPU's fast path, checked on the CPU where its arithmetic is the same."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.spec import (
    AdapterConfig,
    DoraConfig,
    FullFineTuningConfig,
    Ia3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoraConfig,
)
from workers.training import speed
from workers.training.data import (
    IGNORE_INDEX,
    PACKED_LENGTH_MULTIPLE,
    TokenizedExample,
    collate,
    collate_packed,
    real_tokens,
)
from workers.training.methods import METHODS, lora

PAD = 0


def examples(lengths, seed=0, vocab=250):
    """Sequences of random tokens of the given lengths; the first two tokens are prompt (no loss), as SFT rows have."""
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        rows.append(TokenizedExample(ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]))
    return rows


def packed(rows):
    """A packed batch as the model gets it: the loop takes the real token count out first."""
    batch = collate_packed(rows, PAD, batch_size=len(rows))
    real_tokens(batch)
    return batch


def loss_and_lora_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def lora_llama(tiny_llama_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    model = lora.apply(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all_linear"), "causal_lm_sft", "llama")
    # B starts at zero, which would leave A's gradients zero on both sides: give B values so both are compared.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(lora_llama):
    batch_rows = examples([5, 17, 9, 30])
    padded, one_row = collate(batch_rows, PAD), collate_packed(batch_rows, PAD, batch_size=4)

    assert int(real_tokens(one_row)) == int(real_tokens(padded)) == 61
    assert one_row["input_ids"].shape == (1, PACKED_LENGTH_MULTIPLE)  # 61 real tokens, then one padding sequence
    assert one_row["position_ids"][0, :8].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert one_row["position_ids"][0, 61:64].tolist() == [0, 1, 2]
    assert (one_row["labels"][0, 61:] == IGNORE_INDEX).all()
    # Where each sequence starts (the padding's too), then the row's end: what variable-length attention reads.
    assert one_row["cu_seq_lens_q"].tolist() == [0, 5, 22, 31, 61, 256]

    padded_loss, padded_gradients = loss_and_lora_gradients(lora_llama, padded)
    packed_loss, packed_gradients = loss_and_lora_gradients(lora_llama, one_row)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert packed_gradients.keys() == padded_gradients.keys()
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_sequences_do_not_attend_to_each_other(lora_llama):
    first, second = examples([12, 20])
    changed_first = examples([12], seed=99)[0]
    lora_llama.eval()
    with torch.no_grad():
        logits = lora_llama(**packed([first, second])).logits
        logits_after_a_changed_neighbour = lora_llama(**packed([changed_first, second])).logits
        logits_alone = lora_llama(**packed([second])).logits
    assert not torch.allclose(logits[0, :12], logits_after_a_changed_neighbour[0, :12])
    torch.testing.assert_close(logits[0, 12:32], logits_after_a_changed_neighbour[0, 12:32])
    torch.testing.assert_close(logits[0, 12:32], logits_alone[0, :20], rtol=1e-4, atol=1e-5)


def test_the_first_token_of_each_packed_sequence_is_not_a_target():
    rows = [TokenizedExample([5, 6, 7], [5, 6, 7]), TokenizedExample([8, 9], [8, 9])]
    assert collate_packed(rows, PAD, batch_size=2)["labels"][0, :5].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]


def test_a_short_last_batch_keeps_the_sequence_boundaries_of_a_full_one():
    # Rows of one length must bring inputs of one shape for their CUDA graph: the row's end repeats.
    short = collate_packed(examples([12, 20]), PAD, batch_size=4)
    assert short["input_ids"].shape == (1, PACKED_LENGTH_MULTIPLE)
    assert short["cu_seq_lens_q"].tolist() == [0, 12, 32, 256, 256, 256]
    exactly_full = collate_packed(examples([128, 128]), PAD, batch_size=2)
    assert exactly_full["cu_seq_lens_q"].tolist() == [0, 128, 256, 256]


def test_a_packed_row_bounds_its_sequences_by_max_seq_length_and_its_own_length():
    # Flash attention launches blocks for max_length_q positions per sequence: the bound must hold every
    # sequence of the row, the pad's too, and depend only on the row's length (one CUDA graph per length).
    row = collate_packed(examples([300, 500]), PAD, batch_size=2, max_seq_length=512)
    assert row["input_ids"].shape == (1, 1024) and row["max_length_q"] == 512
    # A max_seq_length shorter than the pad (156 tokens here): the bound is the pad's longest, 256.
    short = collate_packed(examples([40, 60]), PAD, batch_size=2, max_seq_length=128)
    assert short["cu_seq_lens_q"].tolist() == [0, 40, 100, 256] and short["max_length_q"] == 256
    # No longer than the row itself.
    assert collate_packed(examples([300]), PAD, batch_size=1, max_seq_length=2048)["max_length_q"] == 512
    assert "max_length_q" not in collate_packed(examples([300]), PAD, batch_size=1)
    with pytest.raises(ValueError, match=r"a packed sequence of 600 tokens is longer than max_seq_length \(512\)"):
        collate_packed(examples([100, 600]), PAD, batch_size=2, max_seq_length=512)


def test_written_gradients_replace_the_ones_before():
    # Graphed steps write the gradients into their buffer (speed.write_gradients) instead of adding to it.
    used, unused = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    used.grad, unused.grad = torch.full((3,), 7.0), torch.full((2,), 7.0)
    buffer = used.grad
    inputs = torch.randn(3)
    speed.write_gradients((used * inputs).sum(), [used, unused])
    assert used.grad is buffer  # written in place, where a captured graph finds it
    torch.testing.assert_close(used.grad, inputs)
    torch.testing.assert_close(unused.grad, torch.zeros(2))
    # Taken through a stand-in the step computed with (a weight's bf16 copy), they still land on the weight.
    stand_in = used.detach().clone().requires_grad_()
    speed.write_gradients((stand_in * 2 * inputs).sum(), [used, unused], [stand_in, unused])
    assert used.grad is buffer
    torch.testing.assert_close(used.grad, 2 * inputs)


def test_padded_batches_under_the_varlen_attention_compute_what_sdpa_does(tiny_llama_path):
    # Held-out rows come padded, with no sequence boundaries: the varlen attention hands them to SDPA.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    batch = collate(examples([5, 17, 9]), PAD)
    with torch.no_grad():
        sdpa_logits = model(**batch).logits
        model.set_attn_implementation(speed.VARLEN)
        assert model.config._attn_implementation == speed.VARLEN
        varlen_logits = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(varlen_logits[real], sdpa_logits[real])


METHOD_CONFIGS = {
    "lora": LoraConfig(r=4, alpha=8, target_modules="all_linear"),
    "qlora": QLoraConfig(r=4, alpha=8),
    "dora": DoraConfig(r=4, alpha=8),
    "ia3": Ia3Config(),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "adapter": AdapterConfig(),
    "full": FullFineTuningConfig(),
}


@pytest.mark.parametrize("method_type", [name for name in METHOD_CONFIGS if name not in ("qlora", "full")])
def test_every_frozen_base_method_trains_on_a_bf16_base(method_type, tiny_llama_path):
    """As on a GPU: the base in bf16, the trained weights float32, the step under bf16 autocast."""
    method = METHODS[method_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.bfloat16)
    model = method.apply(model, METHOD_CONFIGS[method_type], "causal_lm_sft", "llama")
    speed.trainable_in_float32(model)
    rows = examples([6, 11, 8])
    batch = packed(rows) if getattr(method, "PACKS_SEQUENCES", True) else collate(rows, PAD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()

    assert torch.isfinite(loss)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trained
    for name, parameter in trained:
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
    frozen_dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen_dtypes == {torch.bfloat16}


def test_the_base_stays_float32_for_full_fine_tuning_and_on_a_cpu():
    assert speed.base_dtype("full") == torch.float32
    assert speed.base_dtype("lora") == (torch.bfloat16 if speed.on_bf16_gpu() else torch.float32)


def test_a_job_compiles_only_when_its_steps_repay_compiling():
    # Issue 7's 1B LoRA benchmark (N = 1,235,746,816) on an H100: compiling repays itself after some 4,000 steps.
    flops_per_step = speed.flops_per_token("lora", 1_235_746_816) * 2640
    h100 = speed.PEAK_BF16_FLOPS["H100"]
    break_even = speed.COMPILE_SECONDS * h100 / (speed.COMPILE_SAVES_PEAK_TIMES * flops_per_step)
    assert 3000 < break_even < 5000
    assert not speed.compile_repays(flops_per_step, 80, h100)  # the benchmark's 80 steps: eager
    assert not speed.compile_repays(flops_per_step, int(break_even * 0.9), h100)
    assert speed.compile_repays(flops_per_step, int(break_even * 1.1), h100)
    # A GPU of half the peak takes twice as long per step, and so repays sooner.
    assert speed.compile_repays(flops_per_step, int(break_even * 0.6), h100 / 2)
    assert speed.compile_repays(flops_per_step, 1, None)  # an unknown GPU: compiled, as before this estimate


def test_mfu_counts_every_linear_weight_once(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    config = model.config
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    expected = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn) + config.vocab_size * hidden
    assert speed.matmul_parameters(model) == expected
    assert speed.flops_per_token("lora", expected) == 4 * expected
    assert speed.flops_per_token("full", expected) == 6 * expected
