"""How long the GPU waits between graphed steps: loaded through PYTHONPATH (bench/README.md, fifth pass).

    TUNEDECK_DIAG=1 TUNEDECK_DIAG_OUT=gap.json PYTHONPATH=$PWD/bench/step_gap:$PYTHONPATH python bench/train_speed.py ...

Each graphed step's GPU time (CUDA events around GraphedSteps.replay_or_run) against the time from
one step's start on the GPU to the next's: the difference is the optimizer's kernel plus the GPU's
idle time between steps. TUNEDECK_DIAG_PAD sets data.PACKED_LENGTH_MULTIPLE, to try other row lengths.
"""
import os
import sys

if os.environ.get("TUNEDECK_DIAG"):
    sys.path.insert(0, os.getcwd())
    import atexit
    import json
    import statistics
    import time

    import torch

    from workers.training import data, speed

    if os.environ.get("TUNEDECK_DIAG_PAD"):
        data.PACKED_LENGTH_MULTIPLE = int(os.environ["TUNEDECK_DIAG_PAD"])
    records = []
    original = speed.GraphedSteps.replay_or_run

    def timed(self, batch):
        shape = speed.graph_key(batch)
        replay = shape in self.graphs
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        loss = original(self, batch)
        end.record()
        records.append((replay, start, end, t0, shape[0][-1]))
        return loss

    speed.GraphedSteps.replay_or_run = timed

    def report():
        torch.cuda.synchronize()
        rows = []
        for (replay, s, e, t0, n), (_, s2, _, t1, _) in zip(records, records[1:]):
            rows.append({"replay": replay, "fb_ms": s.elapsed_time(e), "period_ms": s.elapsed_time(s2),
                         "wall_ms": 1000 * (t1 - t0), "length": n})
        replays = [r for r in rows if r["replay"]]
        if not replays:  # a process that trained nothing graphed (the bench's own)
            return
        out = {"pad": data.PACKED_LENGTH_MULTIPLE, "steps": len(rows), "replayed": len(replays),
               "lengths": sorted({r["length"] for r in rows}),
               "fb_ms_median": statistics.median(r["fb_ms"] for r in replays),
               "gap_ms_median": statistics.median(r["period_ms"] - r["fb_ms"] for r in replays),
               "gap_ms_mean": statistics.mean(r["period_ms"] - r["fb_ms"] for r in replays),
               "period_ms_median": statistics.median(r["period_ms"] for r in replays),
               "rows": rows}
        path = os.environ.get("TUNEDECK_DIAG_OUT", "/tmp/diag.json")
        with open(path, "w") as file:
            json.dump(out, file)

    atexit.register(report)
