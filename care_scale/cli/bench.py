"""``care-scale bench``: measure this node (decode, patch encoder per backend and precision,
CARE at N patches) and, with ``--plan``, project a cohort onto a cluster shape."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from care_scale.cli.options import add_storage_option_arg, storage_options

PLAN_FLAGS = ("slides_count", "tiles_per_slide", "nodes", "gpus_per_node", "cpus_per_node")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="measure this node and plan a cohort on a cluster",
        description="Measure, side by side in one run on this machine: tile decode per slide "
        "backend (tiles/s per core and per node), the patch encoder with every backend and "
        "precision this machine can run (tiles/s, parity vs torch fp32), CARE forward time "
        "and peak memory at N = 1k, 10k, 50k patches, and the hardware seen. What this "
        "machine cannot run is listed as skipped with the reason. With --plan, project a "
        "cohort (--slides-count x --tiles-per-slide) onto --nodes x --gpus-per-node / "
        "--cpus-per-node: stage rates, bottleneck, wall time, GPU-hours, advice; --rates FILE "
        "plans from a saved `bench --json` result instead of measuring (the formula: "
        "docs/runbook.md, Sizing).")
    p.add_argument("--slides", default=None, metavar="SOURCE",
                   help="slides to decode (folder, glob, prefix or manifest; the first 4); "
                   "default: one generated synthetic slide")
    p.add_argument("--patch-encoder", default=None, metavar="NAME",
                   help="registry patch encoder (default: the job's default on CUDA; on a "
                   "CPU the largest that fits --seconds, see there; vit_micro_patch16_64 with "
                   "--seconds < 5)")
    p.add_argument("--slide-encoder", default="care", metavar="NAME",
                   help="registry slide encoder (default care, the paper's size)")
    p.add_argument("--backends", default="auto", metavar="auto|all|LIST",
                   help="patch-encoder backends: auto (those installed), all (the others "
                   "listed as skipped) or a comma list of torch,onnxruntime,tensorrt")
    p.add_argument("--precisions", default="fp32,bf16,fp16,int8", metavar="LIST",
                   help="comma list of fp32,bf16,fp16,int8 (fp32, the parity reference, is "
                   "always measured)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="time budget of the whole run, model builds, ONNX exports and int8 "
                   "quantisation included (default 20; below 5 the sizes are small: a smoke "
                   "run). Decode, patch encoder and CARE end at 25%%, 70%% and 100%% of it (each "
                   "gets at least its own share). Without --patch-encoder on a CPU, the largest "
                   "of vit_micro/demo/tiny/small/base/large whose fp32 build and 3 calls fit the "
                   "encoder share (from its FLOPs and a matmul probe). After the fp32 reference, "
                   "a backend/precision whose build (estimated from the measured fp32 torch "
                   "build and call, then from the builds so far) and 2 calls would not fit is "
                   "listed as skipped: 'budget: ...'. A CARE size is skipped 'memory: ...' when "
                   "its peak, extrapolated from the smaller sizes, exceeds 80%% of the free "
                   "memory, 'budget: ...' when one forward would not fit; each size is timed "
                   "with one call, and more where they fit")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per encoder call (default 32; 8 with --seconds < 5)")
    p.add_argument("--care-sizes", default=None, metavar="N,N,...",
                   help="CARE sizes in patches (default 1000,10000,50000; 256,1024 with "
                   "--seconds < 5)")
    p.add_argument("--plan", action="store_true", help="project a cohort from the rates")
    p.add_argument("--rates", default=None, metavar="FILE",
                   help="with --plan: a saved `care-scale bench --json` result to plan from "
                   "(no measurement)")
    p.add_argument("--slides-count", type=int, default=None, metavar="N")
    p.add_argument("--tiles-per-slide", type=int, default=None, metavar="N")
    p.add_argument("--nodes", type=int, default=None, metavar="N")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="N")
    p.add_argument("--cpus-per-node", type=int, default=None, metavar="N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _read_rates(path: str) -> dict[str, Any]:
    from care_scale.exceptions import ConfigError

    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--rates {path}: {exc}") from None
    return data.get("bench", data) if isinstance(data, dict) else data


def run(args: argparse.Namespace) -> int:
    from care_scale.bench import BenchConfig, run_bench
    from care_scale.exceptions import ConfigError

    missing = [f"--{f.replace('_', '-')}" for f in PLAN_FLAGS if getattr(args, f) is None]
    if args.plan and missing:
        raise ConfigError(f"--plan needs {', '.join(missing)}")
    if not args.plan and (args.rates or len(missing) < len(PLAN_FLAGS)):
        raise ConfigError("--rates and the cluster flags go with --plan")
    if args.rates:
        result = _read_rates(args.rates)
    else:
        try:
            sizes = tuple(int(n) for n in _csv(args.care_sizes)) if args.care_sizes else None
        except ValueError:
            raise ConfigError(f"--care-sizes {args.care_sizes!r}: expected N,N,...") from None
        backends = _csv(args.backends)
        result = run_bench(BenchConfig(
            slides=args.slides, patch_encoder=args.patch_encoder,
            slide_encoder=args.slide_encoder,
            backends=backends[0] if backends in (("auto",), ("all",)) else backends,
            precisions=_csv(args.precisions), seconds=args.seconds,
            batch_size=args.batch_size, care_sizes=sizes,
            storage_options=storage_options(args.storage_option) or {}))
    plan = _plan(result, args) if args.plan else None
    if args.json:
        json.dump({"bench": result, "plan": plan} if plan else result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    from care_scale.bench import format_bench, format_plan

    if not args.rates:
        print(format_bench(result))
    if plan:
        print(("\n" if not args.rates else "") + format_plan(plan))
    return 0


def _plan(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from care_scale.bench import ClusterShape, plan_cohort, rates_from_bench

    return plan_cohort(rates_from_bench(result),
                       ClusterShape(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                    cpus_per_node=args.cpus_per_node),
                       slides=args.slides_count, tiles_per_slide=args.tiles_per_slide)
