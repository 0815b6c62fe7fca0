"""Turning dataset rows into training examples: what the loss sees, and how rows are split and padded."""

import json
import random

import pytest
from accelerate import Accelerator

from workers.training.data import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    load_training_data,
    make_loader,
    split_train_eval,
    tokenize_sft,
)
from workers.training.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    return load_tokenizer(tiny_llama_path)


def test_loss_is_taken_on_the_completion_and_the_final_eos_only(tokenizer):
    example = tokenize_sft([("reverse: abc\n", False), ("cba", True)], tokenizer, max_length=64)

    prompt_ids = tokenizer("reverse: abc\n", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer("cba", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert example.input_ids == [tokenizer.bos_token_id, *prompt_ids, *completion_ids, eos]
    assert example.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*completion_ids, eos]


def test_chat_turns_train_on_the_assistant_only(tokenizer):
    segments = [("<|user|>\n", False), ("hi\n", False), ("<|assistant|>\n", False), ("hello\n", True)]
    example = tokenize_sft(segments, tokenizer, max_length=64)

    trained = [token for token in example.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "hello\n" + tokenizer.eos_token


def test_rows_whose_completion_is_cut_off_are_skipped(tiny_llama_path, make_run, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "x" * 40, "completion": "too late"}] + [{"prompt": "p", "completion": "c"}] * 9
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = make_run(tiny_llama_path, path, "prompt_completion", max_seq_length=16, eval_fraction=0.0)
    messages = []

    data = load_training_data(run, load_tokenizer(tiny_llama_path), log=messages.append)

    assert len(data.train) == 9
    assert all(len(example.input_ids) <= 16 for example in data.train)
    assert messages == ["skipped 1 examples whose completion starts after max_seq_length tokens"]


def test_split_is_deterministic_and_keeps_every_row_once():
    rows = list(range(50))

    train_rows, eval_rows = split_train_eval(rows, eval_fraction=0.1, seed=3)

    assert (train_rows, eval_rows) == split_train_eval(rows, eval_fraction=0.1, seed=3)
    assert len(eval_rows) == 5 and sorted(train_rows + eval_rows) == rows
    assert split_train_eval(rows, eval_fraction=0.1, seed=4) != (train_rows, eval_rows)


@pytest.mark.parametrize(
    ("rows", "fraction", "held_out"), [(2, 0.1, 1), (10, 0.01, 1), (1, 0.5, 0), (10, 0.0, 0), (3, 0.5, 2)]
)
def test_some_rows_are_held_out_whenever_asked_for(rows, fraction, held_out):
    train_rows, eval_rows = split_train_eval(list(range(rows)), eval_fraction=fraction, seed=0)

    assert len(eval_rows) == held_out and len(train_rows) == rows - held_out


def test_classification_label_ids_follow_the_sorted_label_names(minilm, make_run, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("text,label\nfine,ok\nbad,worse\ngood,better\nnice,ok\n")
    run = make_run(minilm, path, "classification", task="sequence_classification", eval_fraction=0.0)

    data = load_training_data(run, load_tokenizer(minilm))

    assert data.label_names == ["better", "ok", "worse"]
    assert sorted(example.labels for example in data.train) == [0, 1, 1, 2]


def test_batches_are_padded_to_their_longest_row(tokenizer):
    short = tokenize_sft([("a\n", False), ("b", True)], tokenizer, max_length=64)
    long = tokenize_sft([("abcdef\n", False), ("fedcba", True)], tokenizer, max_length=64)

    batch = collate([short, long], pad_token_id=tokenizer.pad_token_id)

    assert batch["input_ids"].shape == (2, len(long.input_ids))
    padding = len(long.input_ids) - len(short.input_ids)
    assert batch["input_ids"][0, -padding:].tolist() == [tokenizer.pad_token_id] * padding
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * padding
    assert batch["labels"][0, -padding:].tolist() == [IGNORE_INDEX] * padding
    assert batch["attention_mask"][1].sum() == len(long.input_ids)


def test_an_epochs_order_depends_on_the_seed_and_the_epoch_only():
    """So a resumed run rebuilds the order of its epoch without replaying the ones before, after prepare() too."""
    examples = [TokenizedExample(input_ids=[row], labels=[row]) for row in range(20)]
    accelerator = Accelerator(cpu=True)

    def prepared_loader(seed):
        return accelerator.prepare(make_loader(examples, batch_size=4, pad_token_id=0, shuffle=True, seed=seed))

    def order(loader, epoch):
        loader.set_epoch(epoch)
        return [row for batch in loader for row in batch["input_ids"][:, 0].tolist()]

    replayed = prepared_loader(seed=7)
    epochs = [order(replayed, epoch) for epoch in range(3)]

    assert order(prepared_loader(seed=7), epoch=2) == epochs[2]
    assert all(sorted(rows) == list(range(20)) for rows in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert order(prepared_loader(seed=8), epoch=0) != epochs[0]


def test_several_processes_get_batches_of_about_as_many_tokens_each_step():
    """A step waits for its slowest process: dealt out by length, each step's batches weigh about the same."""
    rng = random.Random(0)
    # Row r is r + 1 repeated (0 pads): each batch tells which rows it holds.
    examples = [TokenizedExample(input_ids=[row + 1] * rng.randint(32, 1024), labels=[row]) for row in range(96)]

    def batches(processes):
        loader = make_loader(examples, batch_size=8, pad_token_id=0, shuffle=True, seed=3, pack=True, processes=processes)
        loader.sampler.set_epoch(1)
        return [sorted(token - 1 for token in set(batch["input_ids"][0].tolist()) - {0}) for batch in loader]

    def tokens(rows):
        return sum(len(examples[row].input_ids) for row in rows)

    one_process, two_processes = batches(1), batches(2)
    steps = [(one_process[i] + one_process[i + 1], two_processes[i], two_processes[i + 1]) for i in range(0, 12, 2)]
    for rows_one_process, first, second in steps:
        assert sorted(first + second) == sorted(rows_one_process)  # the same rows in each step
        assert len(first) == len(second) == 8
        assert abs(tokens(first) - tokens(second)) <= 1024  # at most one row's worth apart
    imbalance = [abs(tokens(one_process[i]) - tokens(one_process[i + 1])) for i in range(0, 12, 2)]
    assert sum(imbalance) > 3 * sum(abs(tokens(first) - tokens(second)) for _, first, second in steps)
