"""The record layer at scale: encoding cost on the training thread, decoding rate, `bsmon ls` time.

    python benchmarks/record_scale.py --steps 200000 --home /tmp/bsmon-scale

Sessions are made by the real probe (bsmon.watch on a tiny nn.Linear loop with two
micro-batches, so every step carries phase marks and measured steps a noise payload),
once per home, and reused. Prints, for this bsmon:

* encode: microseconds to frame one step record as the publisher does (training thread),
  for a plain step and for a measured one, against json.dumps of the same record;
* decode: records per second reading the big session file back, against reading its bytes;
* bytes per step in the file;
* `bsmon ls` wall time with the big session present, and with 100 small sessions,
  against starting the same Python without listing.

Run it on two checkouts (PYTHONPATH) to compare releases: docs/design.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOOP = """
import sys, torch
from torch import nn
import bsmon
steps, sessions = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
for _ in range(sessions):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    with bsmon.watch(model, opt, name="scale") as monitor:
        for i in range(steps):
            opt.zero_grad()
            for _ in range(2):
                ((model(x) - y) ** 2).mean().backward()
            opt.step()
            if i % 100 == 0:
                monitor.log(loss=1.0)
"""


def make_sessions(home: Path, steps: int, sessions: int) -> None:
    if (home / "sessions").is_dir() and len(list((home / "sessions").iterdir())) >= sessions:
        return
    env = {**os.environ, "BSMON_HOME": str(home)}
    subprocess.run([sys.executable, "-c", LOOP, str(steps), str(sessions)], env=env, check=True)


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def encode_cost(records_path: Path) -> None:
    from bsmon import store, wire
    steps = [r for r in store.read_records(records_path)[0] if r["k"] == "step"]
    plain = next(r for r in steps[5:] if "noise" not in r)
    measured = next((r for r in steps if "noise" in r), None)
    encoder = json.JSONEncoder(separators=(",", ":"))
    for label, record in (("plain step", plain), ("measured step", measured)):
        if record is None:
            continue
        n = 20000
        frame = best_of(lambda: [wire.encode(record) for _ in range(n)]) / n * 1e6
        baseline = best_of(lambda: [encoder.encode(record) for _ in range(n)]) / n * 1e6
        print(f"encode {label:14s} {frame:6.2f} us/record  ({frame / baseline:.2f}x json.dumps "
              f"{baseline:.2f} us; {len(wire.encode(record))} bytes)")


def decode_rate(records_path: Path) -> None:
    from bsmon import store
    size = records_path.stat().st_size
    count = [0]

    def read():
        count[0] = len(store.read_records(records_path)[0])

    elapsed = best_of(read, repeat=2)
    raw = best_of(lambda: records_path.read_bytes(), repeat=2)
    steps = sum(1 for r in store.read_records(records_path)[0] if r["k"] == "step")
    print(f"decode {count[0]} records: {elapsed:.2f} s, {count[0] / elapsed:,.0f} records/s "
          f"({elapsed / raw:.0f}x reading the bytes); {size / steps:.1f} bytes/step in the file")


def ls_time(home: Path) -> float:
    env = {**os.environ, "BSMON_HOME": str(home)}
    bare = best_of(lambda: subprocess.run([sys.executable, "-c", "import bsmon.cli"], env=env, check=True),
                   repeat=3)
    listed = best_of(lambda: subprocess.run([sys.executable, "-m", "bsmon.cli", "ls"], env=env, check=True,
                                            stdout=subprocess.DEVNULL), repeat=3)
    return listed, bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000, help="steps of the big session")
    parser.add_argument("--home", type=Path, default=Path("/tmp/bsmon-scale"), help="where the sessions are kept")
    args = parser.parse_args()
    big, many = args.home / f"big-{args.steps}", args.home / "many-100"
    make_sessions(big, args.steps, 1)
    make_sessions(many, 1000, 100)
    [records_path] = (big / "sessions").glob("*/records.bsr")
    encode_cost(records_path)
    decode_rate(records_path)
    for label, home in ((f"1 session of {args.steps} steps", big), ("100 sessions of 1000 steps", many)):
        listed, bare = ls_time(home)
        print(f"bsmon ls, {label}: {listed:.2f} s ({listed - bare:.2f} s over importing bsmon.cli, {bare:.2f} s)")


if __name__ == "__main__":
    main()
