"""Loss on the held-out rows, and accuracy and macro-F1 for classification."""

from dataclasses import dataclass

import torch

from workers.training.data import IGNORE_INDEX


@dataclass
class Evaluation:
    loss: float
    accuracy: float | None = None  # classification only
    macro_f1: float | None = None  # classification only


@torch.no_grad()
def evaluate(model, loader, task, accelerator):
    """Evaluate on every row of `loader`, over all processes of a multi-GPU run.

    The loss is a mean over every predicted token (SFT) or every row
    (classification) of the eval set, not a mean of batch means, so it does
    not depend on how the rows fall into batches.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    counted = torch.zeros((), dtype=torch.long, device=accelerator.device)
    predictions, labels = [], []
    for batch in loader:
        outputs = model(**batch)
        if task == "sequence_classification":
            count = batch["labels"].numel()
            predictions.append(accelerator.gather_for_metrics(outputs.logits.argmax(dim=-1)))
            labels.append(accelerator.gather_for_metrics(batch["labels"]))
        else:
            # The model predicts token t+1 from position t, so the first label is never a target.
            count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss_sum += outputs.loss.double() * count
        counted += count
    model.train()
    loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(counted, "sum")).item()
    if task != "sequence_classification":
        return Evaluation(loss)
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    accuracy = (predictions == labels).float().mean().item()
    return Evaluation(loss, accuracy, macro_f1(predictions, labels))


def macro_f1(predictions, labels):
    """The mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    Over the classes that occur among the labels or the predictions, as
    scikit-learn counts them, so that a class the eval split lacks does not
    count as a zero.
    """
    scores = []
    for label in torch.cat([predictions, labels]).unique():
        true_positives = ((predictions == label) & (labels == label)).sum().item()
        false_positives = ((predictions == label) & (labels != label)).sum().item()
        false_negatives = ((predictions != label) & (labels == label)).sum().item()
        scores.append(2 * true_positives / (2 * true_positives + false_positives + false_negatives))
    return sum(scores) / len(scores)
