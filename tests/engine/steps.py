"""Plain training steps and logits, for tests that exercise a method module without the engine's loop."""

import torch


def train_steps(model, batch, steps, learning_rate):
    """Steps on one batch with AdamW over the trainable parameters; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits_of(model, batch):
    model.eval()
    return model(**{key: value for key, value in batch.items() if key != "labels"}).logits
