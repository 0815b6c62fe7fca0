"""From a dataset file to batches: tokenize, split into train and eval, pad or pack.

SFT examples become one token sequence whose labels are -100 (no loss) on the
prompt side, so the model learns to write completions, not to echo prompts.
Classification examples become (tokens, label id), label ids taken from the
sorted label names so the same file always gives the same ids.
"""

import random
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.data import DataLoader, Sampler

from jobs.datasets import KIND_OF_TASK, load_examples

IGNORE_INDEX = -100  # the label value that the transformers losses skip


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels for SFT, one class id for classification


@dataclass
class TrainingData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    label_names: list[str] | None  # classification only; index = label id
    pad_token_id: int
    # The forgetting check's rows from the base model's own domain; empty when the job has none.
    reference: list[TokenizedExample] = field(default_factory=list)


def load_training_data(run, tokenizer, log=print):
    """Read, split and tokenize the run's dataset."""
    hyperparameters = run.spec.hyperparameters
    kind = KIND_OF_TASK[run.spec.task]
    examples = load_examples(run.dataset_path, run.dataset_format, run.column_map)
    if kind == "classification" and not isinstance(examples[0], tuple):
        raise ValueError(f"a sequence classification job needs a classification dataset, not {run.dataset_format!r}")
    if kind == "sft" and isinstance(examples[0], tuple):
        raise ValueError("a causal LM fine-tuning job needs an SFT dataset (prompt/completion, alpaca, chat or text)")
    if run.eval_dataset_path:
        # A separate validation file replaces the held-out split.
        train_examples = examples
        eval_examples = load_examples(run.eval_dataset_path, run.eval_dataset_format, run.eval_column_map)
        if isinstance(eval_examples[0], tuple) != isinstance(examples[0], tuple):
            raise ValueError("the validation dataset is not of the same kind as the training dataset")
    else:
        train_examples, eval_examples = split_train_eval(examples, hyperparameters.eval_fraction, hyperparameters.seed)
    max_length = hyperparameters.max_seq_length

    if kind == "classification":
        label_names = sorted({label for _, label in train_examples})
        if len(label_names) < 2:
            raise ValueError(f"classification needs at least two different labels, the dataset has {label_names}")
        unseen = sorted({label for _, label in eval_examples} - set(label_names))
        if unseen:
            raise ValueError(f"the validation dataset has labels the training data lacks: {', '.join(unseen)}")
        label_ids = {name: index for index, name in enumerate(label_names)}

        def tokenize(example):
            return tokenize_classification(example, tokenizer, label_ids, max_length)

    else:
        label_names = None

        def tokenize(example):
            return tokenize_sft(example, tokenizer, max_length)

    train_set = [tokenize(example) for example in train_examples]
    eval_set = [tokenize(example) for example in eval_examples]
    if kind == "sft":
        train_set, eval_set = _with_trained_tokens(train_set), _with_trained_tokens(eval_set)
        skipped = len(train_examples) + len(eval_examples) - len(train_set) - len(eval_set)
        if skipped:
            log(f"skipped {skipped} examples whose completion starts after max_seq_length tokens")
    if not train_set:
        raise ValueError("no training examples left: every completion starts after max_seq_length tokens")
    reference_set = []
    if run.reference_dataset_path:
        reference_examples = load_examples(run.reference_dataset_path, run.reference_dataset_format, run.reference_column_map)
        if isinstance(reference_examples[0], tuple):
            raise ValueError("the reference dataset of the forgetting check must be text for a language model, "
                             "not a classification dataset")
        reference_set = _with_trained_tokens([tokenize(example) for example in reference_examples])
        if not reference_set:
            raise ValueError("the reference dataset has no tokens to measure a loss on within max_seq_length")
    return TrainingData(train_set, eval_set, label_names, pad_token_id=_pad_token_id(tokenizer), reference=reference_set)


def split_train_eval(examples, eval_fraction, seed):
    """Shuffle with the seed and hold out eval_fraction of the rows (at least one when asked for any)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eval_count = round(len(examples) * eval_fraction)
    if eval_fraction > 0 and len(examples) >= 2:
        eval_count = min(max(eval_count, 1), len(examples) - 1)
    else:
        eval_count = 0
    eval_rows = sorted(order[:eval_count])
    train_rows = order[eval_count:]
    return [examples[i] for i in train_rows], [examples[i] for i in eval_rows]


def tokenize_sft(segments, tokenizer, max_length):
    """Concatenate (text, trains_on) segments into one sequence, ending with eos; loss only where trains_on."""
    input_ids, labels = [], []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trains_on in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trains_on else [IGNORE_INDEX] * len(ids)
    # eos teaches the model to stop after a completion; it trains only if the text before it does.
    input_ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id if segments[-1][1] else IGNORE_INDEX)
    return TokenizedExample(input_ids[:max_length], labels[:max_length])


def tokenize_classification(example, tokenizer, label_ids, max_length):
    text, label = example
    input_ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedExample(input_ids, label_ids[label])


def _with_trained_tokens(examples):
    # A prompt longer than max_seq_length leaves no label to learn from, and a
    # batch of such rows would give a loss of 0/0.
    return [example for example in examples if any(label != IGNORE_INDEX for label in example.labels[1:])]


def _pad_token_id(tokenizer):
    # Many causal LMs ship without a pad token; eos is safe as padding because
    # padded positions are masked out of attention and carry no labels.
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")


def collate(examples, pad_token_id):
    """Pad a batch to its longest example; padding is masked out of attention and of the loss."""
    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([example.labels for example in examples])
    else:
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


PACKED_LENGTH_MULTIPLE = 256


def collate_packed(examples, pad_token_id, batch_size, max_seq_length=None):
    """The batch's sequences end to end in one row, padded only up to a multiple of 256 tokens.

    Position ids restart at 0 with each sequence; from them transformers builds an
    attention mask that keeps each sequence to itself (no attention mask may be
    given, or it would not look). Variable-length attention reads the sequences'
    boundaries instead, as cu_seq_lens_q (where each starts, then the row's end):
    always batch_size + 2 entries, repeating the end after a short last batch, so
    that every row of one length has inputs of the same shapes. The first token of
    a sequence is never a target: packed, it would be predicted from the end of the
    sequence before. The loss is then the same mean over the same targets as the
    padded batch's. The few pad tokens at the end form one more sequence with no
    targets; they keep the number of row lengths small, so a compiled step is
    captured for each length once. Given the run's max_seq_length, max_length_q bounds
    every sequence of the row, the pad's too: flash attention then launches blocks for
    that many positions per sequence instead of the whole row's. It depends only on
    the row's length, as a CUDA graph of that length needs.
    """
    input_ids, labels, position_ids, starts = [], [], [], []
    for example in examples:
        starts.append(len(input_ids))
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        position_ids += range(len(example.input_ids))
    real = len(input_ids)
    padding = -real % PACKED_LENGTH_MULTIPLE
    if padding:
        starts.append(real)
    ends = [real + padding] * (batch_size + 2 - len(starts))
    batch = {
        "input_ids": torch.tensor([input_ids + [pad_token_id] * padding]),
        "position_ids": torch.tensor([position_ids + list(range(padding))]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * padding]),
        "cu_seq_lens_q": torch.tensor(starts + ends, dtype=torch.int32),
        # A cache, made by default, would also stop transformers from reading the packing from the positions.
        "use_cache": False,
        REAL_TOKENS: torch.tensor(real),
    }
    if max_seq_length is not None:
        longest = max(len(example.input_ids) for example in examples)
        if longest > max_seq_length:  # attention would leave its end out: never, once tokenized to the limit
            raise ValueError(f"a packed sequence of {longest} tokens is longer than max_seq_length ({max_seq_length})")
        batch["max_length_q"] = min(real + padding, max(max_seq_length, PACKED_LENGTH_MULTIPLE))
    return batch


REAL_TOKENS = "real_tokens"  # a packed batch's count, which is not for the model: take it out with real_tokens()


def real_tokens(batch):
    """The tokens of a batch that are not padding (taken out of a packed batch, which carries the count)."""
    if REAL_TOKENS in batch:
        return batch.pop(REAL_TOKENS)
    return batch["attention_mask"].sum()


class EpochShuffle(Sampler):
    """A new order of the rows each epoch, a function of (seed, epoch) alone.

    A resumed run rebuilds the order of the epoch it stopped in without replaying
    the epochs before it. accelerate's prepared loader calls set_epoch at the start
    of every pass, and every process of a multi-GPU run computes the same order.

    With several processes, each takes the next batch in turn, and a step lasts as
    long as its slowest process's: given the rows' lengths, the rows of each step
    (processes x batch_size of them) are dealt out so that every process gets about
    as many tokens. A step trains on the same rows either way.
    """

    def __init__(self, row_count, seed, lengths=None, batch_size=1, processes=1):
        self.row_count, self.seed, self.epoch = row_count, seed, 0
        self.lengths, self.batch_size, self.processes = lengths, batch_size, processes

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.row_count))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # a str seed is hashed whole, with sha512
        if self.processes > 1 and self.lengths is not None:
            order = self.balanced(order)
        return iter(order)

    def balanced(self, order):
        step_rows = self.batch_size * self.processes
        dealt = []
        for start in range(0, len(order), step_rows):
            rows = order[start : start + step_rows]
            if len(rows) < step_rows:  # the last, short step: accelerate shares it out its own way
                dealt += rows
                continue
            batches = [[] for _ in range(self.processes)]
            for row in sorted(rows, key=lambda row: -self.lengths[row]):  # longest first, to the lightest batch
                open_batches = [batch for batch in batches if len(batch) < self.batch_size]
                min(open_batches, key=lambda batch: sum(self.lengths[row] for row in batch)).append(row)
            dealt += [row for batch in batches for row in batch]
        return dealt

    def __len__(self):
        return self.row_count


def make_loader(
    examples, batch_size, pad_token_id, shuffle=False, seed=0, pack=False, processes=1, max_seq_length=None
):
    """Batches of `batch_size` rows: padded to the longest, or with `pack` in one row of their real tokens.

    Shuffled for `processes` processes, each step's batches carry about as many tokens each.
    """
    sampler = None
    if shuffle:
        lengths = [len(example.input_ids) for example in examples]
        sampler = EpochShuffle(len(examples), seed, lengths, batch_size, processes)
    return DataLoader(
        examples,
        batch_size=batch_size,
        sampler=sampler,
        # Each new iterator draws a seed (for worker processes) from this generator, or else from torch's
        # global one, which dropout uses: a resumed run, starting an iterator mid-epoch where the
        # uninterrupted run did not, would then see different dropout masks.
        generator=torch.Generator().manual_seed(seed),
        # Pinned, a batch goes to the GPU without waiting for the step before it to end (non_blocking in loop.py).
        pin_memory=torch.cuda.is_available(),
        collate_fn=partial(collate_packed, pad_token_id=pad_token_id, batch_size=batch_size, max_seq_length=max_seq_length)
        if pack
        else partial(collate, pad_token_id=pad_token_id),
    )
