"""Where a method's frame time goes: torch.profiler over steady frames of one method.

Steps ``--streams`` streams of real sample frames through the method (untimed warm-up, the
dense first frame included), then profiles ``--frames`` more frames and prints the operators
by self device time (CUDA) or self CPU time, and the wall time per frame against the
device-busy time, which tells launch-bound from arithmetic-bound work.

    PYTHONPATH=. python scripts/profile_method.py --model vitdet-b --resolution 1024 \\
        --method eventful:r=512 --streams 8 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.commands.bench import DEFAULT_VIDEOS, SAMPLES, parse_method, read_streams  # noqa: E402
from models import StreamRunner, build_method, build_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vitdet-b")
    p.add_argument("--resolution", type=int, default=672)
    p.add_argument("--method", default="eventful:r=220", help="NAME[:K=V,...] or none")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="frames before profiling")
    p.add_argument("--frames", type=int, default=4, help="frames profiled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--shapes", action="store_true",
                   help="group the operators by input shapes too")
    p.add_argument("--gpu-path", action="store_true",
                   help="on the CPU, run eventful's batched GPU code path instead of its "
                        "CPU-only blocks of rows (to count the operators a GPU would launch)")
    args = p.parse_args()
    if args.gpu_path:
        from models.methods import eventful

        eventful._by_blocks = lambda qk: False

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(arch=args.model, input_size=args.resolution)
    spec = parse_method(args.method)
    runner = StreamRunner(model, build_method(spec.name, **spec.params), device=device,
                          dtype=getattr(torch, args.dtype), input_size=args.resolution)
    frames = read_streams([SAMPLES / v for v in DEFAULT_VIDEOS], args.streams,
                          args.warmup + args.frames)
    state = runner.new_state(args.streams)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for t in range(args.warmup):
        runner.step([s[t] for s in frames], state)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        start = time.perf_counter()
        for t in range(args.warmup, args.warmup + args.frames):
            runner.step([s[t] for s in frames], state)
        sync()
        wall = (time.perf_counter() - start) / args.frames
    events = prof.key_averages(group_by_input_shape=args.shapes)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # operators only (their kernels are listed beside them: summing both would count twice)
    busy = sum(getattr(e, key) for e in events if e.key.startswith("aten::")) / 1e3 / args.frames
    print(f"{args.method} on {args.model} at {args.resolution}, {args.streams} stream(s), "
          f"{args.device} {args.dtype}: {wall * 1e3:.1f} ms wall per frame, "
          f"{busy:.1f} ms {'device' if device.type == 'cuda' else 'CPU'} self time per frame, "
          f"{sum(e.count for e in events if e.key.startswith('aten::')) / args.frames:.0f} "
          f"aten calls per frame")
    print(events.table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
