"""Loss (and accuracy, for classification) on the held-out rows."""

import torch

from workers.training.data import IGNORE_INDEX


@torch.no_grad()
def evaluate(model, loader, task):
    """Return (eval_loss, eval_accuracy); accuracy is None for causal LM fine-tuning.

    The loss is a mean over every predicted token (SFT) or every row
    (classification) of the eval set, not a mean of batch means, so it does
    not depend on how the rows fall into batches.
    """
    model.eval()
    loss_sum, counted, correct = 0.0, 0, 0
    for batch in loader:
        outputs = model(**batch)
        if task == "sequence_classification":
            count = batch["labels"].numel()
            correct += (outputs.logits.argmax(dim=-1) == batch["labels"]).sum().item()
        else:
            # The model predicts token t+1 from position t, so the first label is never a target.
            count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        loss_sum += outputs.loss.item() * count
        counted += count
    model.train()
    accuracy = correct / counted if task == "sequence_classification" else None
    return loss_sum / counted, accuracy
