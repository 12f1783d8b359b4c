"""``python -m bsmon.sweep [options] script.py [args]``: profile a script's ``step_fn``.

``bsmon sweep -- python script.py`` runs this module with the script's own
interpreter. The convention the script follows:

* it defines a top-level ``step_fn(batch_size)`` that runs one full training
  step (forward, backward, optimizer step) at that batch size;
* its training loop sits under ``if __name__ == "__main__":``, so loading the
  script for a sweep defines ``step_fn`` without training.

The profile is printed and saved under ``$BSMON_HOME/profiles/``; give its id
to ``bsmon run --profile ID`` (or ``bsmon.watch(..., profile=ID)``) and the
job's recommendation uses it.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from bsmon import fmt, store
from bsmon.profiling import profile

SWEEP_RUN_NAME = "__bsmon_sweep__"


def load_step_fn(script: Path, args: list[str]):
    """Run the script's top level (not its main block) and return its ``step_fn``."""
    sys.argv = [str(script), *args]
    namespace = runpy.run_path(str(script), run_name=SWEEP_RUN_NAME)
    step_fn = namespace.get("step_fn")
    if not callable(step_fn):
        raise SystemExit(
            f"bsmon sweep: {script} defines no step_fn(batch_size). Add a top-level function that runs one "
            "full training step at the given batch size, and keep the training loop under "
            "`if __name__ == \"__main__\":`.")
    return step_fn


def print_profile(result) -> None:
    print(f"batch sizes in {result.units.describe()}; a job converts them to its own unit and ranks")
    print(f"{'batch':>8} {'step time':>12} {result.unit + '/s':>12} {'peak memory':>12}")
    for p in result.points:
        memory = "N/A" if p.peak_memory_bytes is None else f"{p.peak_memory_bytes / 2**20:.1f} MiB"
        print(f"{p.batch_size:>8} {fmt.duration(p.step_time_s):>12} {fmt.si(p.samples_per_s):>12} {memory:>12}")
    print(f"stopped: {result.stop_reason}" + (f" (out of memory at {result.oom_batch})" if result.oom_batch else ""))
    fit = result.fit
    if fit is not None:
        if fit.fits:
            print(f"fit: t(B) = {fmt.duration(fit.alpha_s)} + B x {fmt.duration(fit.beta_s_per_sample)}; "
                  f"r_max {fmt.si(fit.r_max)} samples/s, B_half {fit.b_half:.3g}, knee {fit.knee_batch}")
        else:
            print(f"the linear model does not fit: {fit.reason}; knee {fit.knee_batch}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bsmon sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="comma-separated batch sizes (default: double until OOM or plateau)")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--name", help="profile name (default: the script's name)")
    parser.add_argument("script", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    if not options.script.is_file():
        parser.error(f"no such script: {options.script}")
    sizes = [int(s) for s in options.sizes.split(",")] if options.sizes else None
    step_fn = load_step_fn(options.script, options.args)
    result = profile(step_fn, sizes, max_batch=options.max_batch, warmup=options.warmup,
                     steps=options.steps, start=options.start,
                     on_point=lambda p: print(f"  measured batch {p.batch_size}: {fmt.si(p.samples_per_s)} samples/s",
                                              flush=True))
    print_profile(result)
    path = store.save_profile(result.to_dict(), options.name or options.script.stem)
    print(f"saved {path}\nuse it: bsmon run --profile {path.stem} -- python {options.script}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
