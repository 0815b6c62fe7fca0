"""The training engine: `python -m workers.training SPEC.json OUTDIR` runs one job.

Plain Python on torch, transformers, peft and accelerate; it imports nothing of
Django, so it runs the same in a worker's child process and on a laptop.
"""
