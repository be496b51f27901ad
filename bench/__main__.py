"""`python -m bench`: time every registered op's providers on the device present (CUDA if
there is one, else CPU), then write a CSV and PNG plots and print a markdown table last."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from bench import environment, report, runner
from bench.registry import REGISTRY, OpSpec
from bench.shape import Shape

_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)(c?)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="one small shape, one dtype, short timings (a smoke run of every path)")
    parser.add_argument("--dtype", nargs="+", choices=list(runner.DTYPES),
                        help="default: fp32 bf16 on CPU, fp16 bf16 on CUDA (--quick: the first)")
    parser.add_argument("--shapes", nargs="+", metavar="SET|BxSxHxD[c]",
                        help="shape set names of the op (CPU default: spec; CUDA: bert sweep) or "
                             "explicit shapes such as 8x512x12x64, with a trailing c for causal")
    parser.add_argument("--mode", nargs="+", choices=runner.MODES, default=list(runner.MODES))
    parser.add_argument("--ops", nargs="+", choices=sorted(REGISTRY), default=sorted(REGISTRY))
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help="time only these providers (the rest are reported as not selected)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float,
                        help="CPU seconds of timed calls per case (default 0.5, --quick 0.05)")
    parser.add_argument("--rounds", type=int,
                        help="CPU: interleaved timing rounds per case, each timing every provider "
                             "for min-run-time / rounds (default 3, --quick 1)")
    parser.add_argument("--out", type=Path, default=environment.REPO_ROOT / "bench" / "results",
                        help="directory for the CSV and PNG files (default: bench/results/)")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                        help="write a PNG per op beside the CSV (default: yes)")
    return parser.parse_args(argv)


def _shapes(op: OpSpec, args: argparse.Namespace) -> list[Shape]:
    if args.quick and not args.shapes:
        return [op.quick_shape]
    shapes = []
    for token in args.shapes or op.default_shape_sets[args.device]:
        if token in op.shape_sets:
            shapes += op.shape_sets[token]
        elif match := _SHAPE.match(token):
            B, S, H, D = (int(g) for g in match.groups()[:4])
            shapes.append(Shape(B=B, S=S, H=H, D=D, causal=bool(match.group(5))))
        else:
            raise SystemExit(f"--shapes: {token!r} is neither a shape set of {op.name} "
                             f"({', '.join(op.shape_sets)}) nor BxSxHxD[c]")
    return shapes


def _dtypes(op: OpSpec, args: argparse.Namespace) -> list[str]:
    return args.dtype or op.dtypes[args.device][: 1 if args.quick else None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit(f"--rounds: expected at least 1, got {args.rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    started = time.perf_counter()
    torch.set_num_threads(environment.usable_cores())
    ops = [REGISTRY[name] for name in args.ops]
    known = {p.name for op in ops for p in op.providers(args.device)}
    if args.providers and (unknown := set(args.providers) - known):
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; known: {sorted(known)}")
    plan = runner.Plan(
        ops=[(op, _shapes(op, args), _dtypes(op, args)) for op in ops], modes=args.mode,
        device=args.device, only_providers=args.providers,
        min_run_time=args.min_run_time or (0.05 if args.quick else 0.5),
        rounds=args.rounds or (1 if args.quick else 3))

    rows, unavailable, interrupted = runner.run(plan)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"{args.device}.csv"
    report.write_csv(rows, csv_path)
    plots = report.plot(rows, lambda op: args.out / f"{args.device}-{op}.png") if args.plot else []
    if rows:
        print(f"device: {rows[0]['device']}; commit {rows[0]['commit']}")
    print(f"wrote {csv_path}" + "".join(f", {path}" for path in plots))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if interrupted:
        print(f"interrupted: {len(rows)} rows measured before the interrupt, the rest not run")
    if unavailable:
        print(report.unavailable_summary(unavailable))
    print()
    print(report.markdown_table(rows, unavailable, {op.name: op.baseline for op in ops}))
    sys.stdout.flush()
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
