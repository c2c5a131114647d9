"""``care-scale embed``: embed a cohort of slides (or patch-feature files) into Delta tables.

    care-scale embed SOURCE --warehouse URI [--config job.yaml] [--keep-patches] [--features]
                     [--backend auto|tensorrt|onnxruntime|torch] [--mpp-override MPP]
                     [--storage-option KEY=VALUE ...] [--set key=value ...]
    care-scale embed --demo [--out DIR]

Exit status: 0 when every slide was embedded (or was already done), 3 when the job finished
but some slides failed (each is a row in the ``failures`` table and a line of the summary),
2 on a configuration, storage or table error (one line on stderr).
"""

from __future__ import annotations

import argparse

from care_scale.cli.options import add_mpp_override_arg, add_storage_option_arg, storage_options

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_SLIDES_FAILED = 3


def _choices(field: str) -> tuple[str, ...]:
    """The values of an ``EmbedConfig`` Literal field (one spelling: the config's)."""
    import typing

    from care_scale.embed.config import EmbedConfig

    return typing.get_args(typing.get_type_hints(EmbedConfig)[field])


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="folder, URI prefix or glob (s3://bucket/cohort/*.svs), or a manifest "
                   "(.csv/.parquet with uri, optional slide_id, mpp, cohort, metadata columns)")
    p.add_argument("--warehouse", help="Delta warehouse URI (local path or s3://...)")
    p.add_argument("--config", help="job YAML file (local or fsspec URI)")
    p.add_argument("--keep-patches", action="store_true", default=None,
                   help="also write patch features to the patches table")
    p.add_argument("--annotations", metavar="DIR", default=None,
                   help="folder of QuPath/GeoJSON files, SLIDE_ID.geojson: tile only the "
                   "annotated areas (annotations.exclude_classes: areas to leave out)")
    p.add_argument("--overlays", action="store_true", default=None,
                   help="also write pictures and QuPath GeoJSON of each slide's regions to "
                   "WAREHOUSE/overlays/SLIDE_ID/")
    p.add_argument("--features", action="store_true", default=None,
                   help="SOURCE holds patch-feature files (.h5, .parquet, CARE .npy)")
    p.add_argument("--backend", choices=_choices("backend"),
                   help="patch-encoder inference backend")
    p.add_argument("--precision", choices=_choices("precision"),
                   help="patch-encoder precision (default fp32; bf16/fp16: torch autocast, "
                        "int8: quantised ONNX; part of the model version)")
    add_mpp_override_arg(p)  # config field mpp_override (a manifest's mpp column wins)
    add_storage_option_arg(p)  # entries of the config field storage_options
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set target_mpp=1.0")
    p.add_argument("--demo", action="store_true",
                   help="generate a small synthetic cohort, embed it with seeded tiny models "
                   "into a local warehouse and query it")
    p.add_argument("--out", default="care-scale-demo", help="--demo: output folder")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="embed a cohort into Delta Lake tables",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=handle)


def config_from_args(args: argparse.Namespace):
    """The typed EmbedConfig: YAML file, then named flags, then ``--set`` overrides.

    ``--storage-option`` entries are added to the file's ``storage_options`` and also used to
    read a ``--config`` in object storage.
    """
    from care_scale.config import load_config, merge_trees, parse_overrides
    from care_scale.embed.config import EmbedConfig

    flags: dict = {}
    if args.source:
        flags["source"] = args.source
    if args.warehouse:
        flags["warehouse"] = args.warehouse
    if args.keep_patches:
        flags["keep_patches"] = True
    if args.overlays:
        flags["overlays"] = True
    if args.annotations:
        flags["annotations"] = {"dir": args.annotations}
    if args.features:
        flags["features"] = True
    if args.backend:
        flags["backend"] = args.backend
    if args.precision:
        flags["precision"] = args.precision
    if args.mpp_override is not None:
        flags["mpp_override"] = args.mpp_override
    options = storage_options(args.storage_option)
    if options:
        flags["storage_options"] = options
    flags = merge_trees(flags, parse_overrides(args.overrides))
    return load_config(EmbedConfig, args.config, flags, storage_options=options)


def handle(args: argparse.Namespace) -> int:
    if args.demo:
        from care_scale.embed.demo import run_demo

        summary = run_demo(args.out, overrides=args.overrides)
    else:
        from care_scale.embed import run_embedding

        summary = run_embedding(config_from_args(args))
        print(summary.format())
    return EXIT_SLIDES_FAILED if summary.failed else EXIT_OK
