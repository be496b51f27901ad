"""One-thread CPU time of the ``cpu`` backend in two source trees (each with its extension built
in place), compared in separate processes, rounds interleaved (base, new, base, new, ...), so that
load from other work on the machine hits both alike; prints each tree's median per shape and the
median of the per-round ratios base / new. The timer is the calling thread's CPU time
(``time.thread_time``) at ``torch.set_num_threads(1)``: what a busy shared machine still measures.

    python -m bench.paired_trees BASE_TREE NEW_TREE [--dtype bfloat16] [--isa avx512_amx] [--rounds 7]

Shapes (B, S, H) at D = 64, shared weights (``shared_attention``, ``--causal`` for causal heads),
forward and forward+backward: (32, 128, 12), (8, 512, 12), (1, 2048, 12), (1, 4096, 1) by default
(``--shapes 8x512x12,...``)."""

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time, torch
tree, dtype, shapes, seconds = sys.argv[1], getattr(torch, sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
causal = sys.argv[5] == "causal"
sys.path.insert(0, tree)
import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend
assert sk.__file__.startswith(tree), sk.__file__
torch.set_num_threads(1)
out = {"isa": cpu_backend.kernel_isa(), "ms": {}}
for B, S, H in shapes:
    torch.manual_seed(0)
    y = torch.randn(B, S, H, 64, dtype=dtype)
    leaf = y.clone().requires_grad_()
    grad = torch.randn_like(y)
    calls = {"fwd": lambda: sk.shared_attention(y, causal=causal, backend="cpu"),
             "fwd+bwd": lambda: torch.autograd.grad(sk.shared_attention(leaf, causal=causal, backend="cpu"), leaf, grad)}
    for name, call in calls.items():
        call()
        times, spent = [], 0.0
        while spent < seconds or len(times) < 3:
            t0 = time.thread_time()
            call()
            times.append(time.thread_time() - t0)
            spent += times[-1]
        out["ms"][f"{B}x{S}x{H} {name}"] = 1e3 * sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("new")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--isa", default="", help="SYMATTN_CPU_ISA for both (default: the widest)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per call and round")
    parser.add_argument("--shapes", default="32x128x12,8x512x12,1x2048x12,1x4096x1")
    parser.add_argument("--causal", action="store_true", help="causal heads")
    args = parser.parse_args()
    shapes = [[int(x) for x in s.split("x")] for s in args.shapes.split(",")]
    env = {**os.environ, **({"SYMATTN_CPU_ISA": args.isa} if args.isa else {})}
    runs = {"base": [], "new": []}
    for _ in range(args.rounds):
        for name in ("base", "new"):
            tree = os.path.abspath(getattr(args, name))
            result = subprocess.run([sys.executable, "-c", _CHILD, tree, args.dtype, json.dumps(shapes),
                                     str(args.seconds), "causal" if args.causal else "full"], capture_output=True, text=True, env=env, cwd=tree)
            if result.returncode != 0:
                sys.exit(result.stderr[-4000:])
            runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    isas = {r["isa"] for rs in runs.values() for r in rs}
    print(f"{args.dtype}{', causal' if args.causal else ''}, kernel set {', '.join(sorted(isas))}, 1 thread, "
          f"{args.rounds} interleaved rounds, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'shape':<22} {'base ms':>9} {'new ms':>9} {'base/new':>9}")
    for key in runs["base"][0]["ms"]:
        base = [r["ms"][key] for r in runs["base"]]
        new = [r["ms"][key] for r in runs["new"]]
        ratio = statistics.median(b / n for b, n in zip(base, new))
        print(f"{key:<22} {statistics.median(base):>9.2f} {statistics.median(new):>9.2f} {ratio:>9.3f}")


if __name__ == "__main__":
    main()
