"""Runs the lipjax benchmarks and writes BENCHMARKS.md.

  python -m benchmarks.run --quick          # a few minutes on 2 CPU cores
  python -m benchmarks.run                  # the full grid
  python -m benchmarks.run --only bound,train
  python -m benchmarks.run --only residual --quick   # about 2 minutes

One JSON line per measurement goes to stdout; the generated section of
BENCHMARKS.md (between its markers) is replaced, hand-written notes are kept.
The residual networks' section is opt-in (hours at 32 blocks) and has its
own generated section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from benchmarks import bench_bound, bench_residual, bench_train, common
from benchmarks import report

SECTIONS = ("peak", "train", "bound", "certification", "depth", "tightness",
            "ablation")
# Not run by default; written to their own generated section.
OPT_IN = ("residual",)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer cases and repetitions (a few minutes)")
  parser.add_argument("--only", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {SECTIONS} or "
                      f"{OPT_IN} (opt-in; default: all of the former)")
  parser.add_argument("--output", default="BENCHMARKS.md",
                      help="markdown file to update ('' to skip)")
  parser.add_argument("--jsonl", default="",
                      help="also append the records to this file")
  parser.add_argument("--archs", default="",
                      help="comma-separated architectures for the train and "
                      "certification sections (default: 4C3F,6C2F; "
                      "8C2F is 64x64x3 with 200 classes)")
  parser.add_argument("--trained-workdir", default="runs/fashion_mnist_quick",
                      help="train.py workdir of a trained model (tightness)")
  parser.add_argument("--trained-residual-workdir", default="",
                      help="train.py workdir of a trained residual model "
                      "(residual section; restored read-only)")
  parser.add_argument("--residual-records", default="",
                      help="JSONL file the residual records are appended to "
                      "as they are measured; a rerun with the same file "
                      "measures only the missing ones")
  args = parser.parse_args(argv)
  only = set(args.only.split(","))
  archs = tuple(a for a in args.archs.split(",") if a) or None
  unknown_archs = set(archs or ()) - set(common.ARCHS)
  if unknown_archs:
    parser.error(f"unknown archs {sorted(unknown_archs)}; use "
                 f"{tuple(common.ARCHS)}")
  unknown = only - set(SECTIONS) - set(OPT_IN)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; use "
                 f"{SECTIONS + OPT_IN}")
  residual_workdir = args.trained_residual_workdir
  if (residual_workdir or args.residual_records) and "residual" not in only:
    parser.error("--trained-residual-workdir and --residual-records need "
                 "--only residual")
  if residual_workdir and not os.path.isfile(
      os.path.join(residual_workdir, "config.json")):
    parser.error(f"--trained-residual-workdir {residual_workdir} is not a "
                 "train.py workdir (no config.json)")

  start = time.perf_counter()
  machine = common.machine_info()
  print(json.dumps({"name": "machine", **machine}), flush=True)
  records = []
  peak = common.matmul_peak(2048, repeats=5 if args.quick else 9)
  common.emit({"name": "matmul_peak", "arch": None, **peak}, records)
  if "train" in only:
    bench_train.train_steps(quick=args.quick, sink=records, archs=archs)
  if "bound" in only:
    bench_bound.bound_grid(quick=args.quick, sink=records,
                           peak_gflops=peak["gflops"])
  if "certification" in only:
    bench_bound.certification(quick=args.quick, sink=records, archs=archs)
  if "depth" in only:
    bench_bound.depth_scaling(quick=args.quick, sink=records,
                              peak_gflops=peak["gflops"])
  if "tightness" in only:
    bench_bound.tightness(quick=args.quick, sink=records,
                          trained_workdir=args.trained_workdir)
  if "ablation" in only:
    bench_train.ablation_unroll(quick=args.quick, sink=records)
    bench_train.ablation_conv(quick=args.quick, sink=records)
  residual = common.Records(args.residual_records)
  if "residual" in only:
    bench_residual.run(quick=args.quick, sink=residual,
                       trained_workdir=residual_workdir)
  meta = {"command": "python -m benchmarks.run " + " ".join(
              argv if argv is not None else sys.argv[1:]),
          "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
          "wall_s": time.perf_counter() - start, "machine": machine,
          "load_end": common.load_average(), "peak": peak,
          "peak_rss": common.peak_rss_bytes()}
  if args.jsonl:
    with open(args.jsonl, "a") as f:
      for r in records + residual:
        f.write(json.dumps(r) + "\n")
  if args.output:
    if only & set(SECTIONS):
      report.write(args.output, records, meta)
    if residual:
      report.write(args.output, residual, meta, section="residual")
    print(f"# wrote {os.path.abspath(args.output)} "
          f"({meta['wall_s']:.0f} s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
