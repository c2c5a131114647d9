"""``care-scale export patch-encoder|slide-encoder``: ONNX (+ TensorRT) artifacts with parity.

    care-scale export patch-encoder --model vit_base_patch16_224 --out s3://b/exports/vitb \
        --storage-option aws_endpoint_url=http://127.0.0.1:9000 [--tensorrt]
    care-scale export slide-encoder --model care --checkpoint s3://b/ckpt/care --out ./care-onnx

Maps one-to-one to :func:`care_scale.export.export_patch_encoder` /
:func:`care_scale.export.export_slide_encoder` and prints the parity figures.
"""

from __future__ import annotations

import argparse

from care_scale.choices import TensorRTPrecision, values
from care_scale.cli.options import add_storage_option_arg, storage_options
from care_scale.exceptions import ConfigError


def _common(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", required=default_model is None, default=default_model,
                   help="registry name" + (f" (default {default_model})" if default_model else ""))
    p.add_argument("--checkpoint", help="checkpoint directory or file (local or fsspec URI); "
                   "without it the seeded untrained weights are exported (warned)")
    p.add_argument("--out", required=True, help="artifact directory (local path or s3://...)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build a TensorRT engine for this machine's GPU")
    add_storage_option_arg(p)
    p.add_argument("--tol", type=float, default=1e-4, help="parity tolerance (relative)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export encoders to ONNX / TensorRT with parity checks",
        description="Export a patch encoder or the CARE slide encoder to an artifact directory "
                    "(ONNX with metadata, manifest.json, optional TensorRT engine). A failed "
                    "parity check fails the export with the numbers.",
    )
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)

    pe = sub.add_parser("patch-encoder", help="ViT patch encoder (dynamic batch)")
    _common(pe, None)
    pe.add_argument("--tile-size", type=int,
                    help="tile side the graph takes (default: the encoder's input size)")
    pe.add_argument("--parity-slide", help="also check parity on real tiles of this slide")
    pe.add_argument("--parity-tiles", type=int, default=8, help="tiles per parity check")
    pe.add_argument("--int8", action="store_true",
                    help="also write model.int8.onnx (dynamic int8, per-channel weights; "
                         "faster on CPUs with VNNI, ~3e-2 relative error, own model version)")
    pe.add_argument("--int8-weights", type=int, choices=(7, 8), default=7,
                    help="bits of the int8 weights: 7 runs on any CPU; 8 is closer to fp32 "
                         "but loads only where every worker's CPU has VNNI / AMX-INT8")
    pe.add_argument("--precision", choices=values(TensorRTPrecision), default="fp16",
                    help="TensorRT precision (int8 needs --calibration-slide)")
    pe.add_argument("--calibration-slide", help="slide whose tiles calibrate INT8")
    pe.add_argument("--min-batch", type=int, default=1)
    pe.add_argument("--opt-batch", type=int, default=64)
    pe.add_argument("--max-batch", type=int, default=256)
    pe.set_defaults(func=run_patch)

    se = sub.add_parser("slide-encoder", help="CARE slide encoder (dynamic number of patches)")
    _common(se, "care")
    se.add_argument("--parity-sizes", default="97,1500",
                    help="comma-separated patch counts of the random parity slides")
    se.set_defaults(func=run_slide)


def _print(result, as_json: bool) -> None:
    print(result.summary())
    if as_json:
        print(result.manifest.to_json())


def run_patch(args: argparse.Namespace) -> int:
    from care_scale.export import export_patch_encoder

    options = storage_options(args.storage_option)
    trt_options = None
    if args.tensorrt:
        from care_scale.export.tensorrt import EngineOptions
        from care_scale.inference.tensorrt_backend import require_tensorrt

        require_tensorrt()  # the one-line error comes before any model is built
        calib = None
        if args.precision == "int8":
            if not args.calibration_slide:
                raise ConfigError("--precision int8 needs --calibration-slide")
            from care_scale.export.parity import slide_tiles
            from care_scale.models import get_patch_encoder_spec

            size = args.tile_size or get_patch_encoder_spec(args.model).input_size
            calib = slide_tiles(args.calibration_slide, 512, size)
        trt_options = EngineOptions(precision=args.precision, min_batch=args.min_batch,
                                    opt_batch=args.opt_batch, max_batch=args.max_batch,
                                    calibration_tiles=calib)
    result = export_patch_encoder(
        args.model, out=args.out, checkpoint=args.checkpoint, storage_options=options,
        opset=args.opset, tile_size=args.tile_size, tensorrt=args.tensorrt,
        tensorrt_options=trt_options, parity_slide=args.parity_slide,
        parity_tiles=args.parity_tiles, tol=args.tol, int8=args.int8,
        int8_weight_bits=args.int8_weights,
    )
    _print(result, args.json)
    return 0


def run_slide(args: argparse.Namespace) -> int:
    from care_scale.export import export_slide_encoder

    try:
        sizes = tuple(int(s) for s in args.parity_sizes.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(f"--parity-sizes: {args.parity_sizes!r} is not a list of ints") from exc
    if args.tensorrt:
        from care_scale.inference.tensorrt_backend import require_tensorrt

        require_tensorrt()
    result = export_slide_encoder(
        args.model, out=args.out, checkpoint=args.checkpoint,
        storage_options=storage_options(args.storage_option), opset=args.opset,
        tensorrt=args.tensorrt, parity_sizes=sizes, tol=args.tol,
    )
    _print(result, args.json)
    return 0

