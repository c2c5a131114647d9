"""Text tables of a bench result and of a plan (``--json`` prints the dicts themselves)."""

from __future__ import annotations

from typing import Any


def _num(value: float | None, fmt: str = ",.1f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return [line.format(*header), line.format(*("-" * w for w in widths)),
            *(line.format(*r) for r in rows)]


def format_bench(result: dict[str, Any]) -> str:
    from care_scale.bench.hardware import describe

    hw, slides = result["hardware"], result["slides"]
    out = [(f"machine: {describe(hw)}; memory {hw['memory_gib']} GiB; torch "
           f"{hw['libraries'].get('torch')}, {result['config']['torch_threads']} threads"),
           (f"slides: {slides['source']}: {slides['count']} slide(s), {slides['tissue_tiles']} "
           f"tissue tiles of {slides['tile_size']} px at {slides['target_mpp']} um/px"), "",
           "decode (tiles/s)"]
    out += _table(["backend", "1 worker", f"{hw['cores']} workers", "per core (CPU time)",
                   "CPU ms/tile", "note"],
                  [[e["backend"], _num(e["tiles_per_s_one_worker"]),
                    _num(e["tiles_per_s_node"]), _num(e["tiles_per_s_per_core"]),
                    _num(e["cpu_ms_per_tile"], ".2f"), e["skipped"] or ""]
                   for e in result["decode"]])
    pe = result["patch_encoder"]
    trained = "" if pe["trained"] else ", seeded random weights"
    out += ["", (f"patch encoder {pe['model']} ({pe['input_size']} px, dim {pe['embed_dim']}"
            f"{trained}); parity vs {pe['reference']}")]
    out += _table(["backend", "device", "precision", "mode", "tiles/s", "min cos",
                   "max |diff|", "note"],
                  [[e["backend"], e["device"], e["precision"], e["mode"],
                    _num(e["tiles_per_s"]), _num(e["min_cosine"], ".5f"),
                    _num(e["max_abs_err"], ".2e"), e["skipped"] or ""]
                   for e in pe["entries"]])
    se = result["slide_encoder"]
    out += ["", (f"slide encoder {se['model']} (in {se['in_dim']}, hidden {se['hidden_dim']}) "
            "forward")]
    out += _table(["N", "device", "seconds", "ms / 1k patches", "peak MiB", "note"],
                  [[f"{e['n']:,}", e["device"], _num(e["seconds"], ".3f"),
                    _num(e["ms_per_1k_patches"]), _num(e["peak_memory_mib"]),
                    e["skipped"] or ""] for e in se["entries"]])
    out.append(f"\nmeasured side by side in one run ({result['elapsed_s']:.0f} s, "
               f"{result['created']})")
    return "\n".join(out)


def format_plan(plan: dict[str, Any]) -> str:
    c = plan["cluster"]
    out = [(f"plan: {plan['slides']:,} slides x {plan['tiles_per_slide']:,} tiles = "
           f"{plan['tiles']:,} tiles on {c['nodes']} node(s) x {c['gpus_per_node']} GPU(s), "
           f"{c['cpus_per_node']} CPUs"),
           f"rates measured on: {plan['rates_from']}", ""]
    shares = plan.get("core_time_shares") or {}
    out += _table(["stage", "tiles/s (cluster)", "share of core time"],
                  [[name, _num(rate, ",.0f"), f"{shares[name]:.0%}" if name in shares else ""]
                   for name, rate in plan["stage_tiles_per_s"].items()])
    out += ["", (f"bottleneck: {plan['bottleneck']}; cohort rate {plan['tiles_per_s']:,.0f} "
            f"tiles/s"), (f"wall time: {plan['wall_hours']:,.2f} h; GPU-hours: "
            f"{plan['gpu_hours']:,.1f} held, {plan['gpu_busy_hours']:,.1f} busy")]
    out += [f"- {line}" for line in plan["advice"]]
    return "\n".join(out)


__all__ = ["format_bench", "format_plan"]
