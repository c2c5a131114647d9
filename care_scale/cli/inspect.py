"""``care-scale inspect``: metadata, backend, tile count and a tissue thumbnail of one slide."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from care_scale.choices import TilingMode, values
from care_scale.cli.options import add_mpp_override_arg, add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="show a slide's metadata, backend and tile count",
        description="Open one slide (local path or fsspec URI), print its metadata, the backend "
        "that reads it and how many tissue tiles it has at the target MPP.",
    )
    p.add_argument("slide_uri", nargs="?", help="slide path or URI (s3://, gs://, https://)")
    p.add_argument("--demo", action="store_true",
                   help="generate a small synthetic slide in a temporary folder and inspect it")
    add_mpp_override_arg(p)
    p.add_argument("--target-mpp", type=float, default=0.5, help="tiling MPP (default 0.5)")
    p.add_argument("--patch-size", type=int, default=224, help="tile size in px (default 224)")
    p.add_argument("--tiling", choices=values(TilingMode), default="native",
                   help="tiling mode: native (care-scale's grid) or trident (TRIDENT's grid, "
                   "Otsu mask and keep rule); default native")
    p.add_argument("--min-tissue-fraction", type=float, default=None,
                   help="tissue share a tile needs (default: the mode's, native 0.5, trident 0)")
    readers = ["auto", "cucim", "openslide", "tifffile"]
    p.add_argument("--slide-backend", dest="slide_backend", default="auto", choices=readers,
                   help="slide reader (default auto: the first that opens the file)")
    # The old spelling: on `embed`, --backend is the inference kind, so here it was renamed.
    p.add_argument("--backend", dest="slide_backend", choices=readers,
                   action=_DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument("--thumbnail", metavar="OUT.png", default=None,
                   help="write a thumbnail PNG with the tissue contour drawn")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


class _DeprecatedAlias(argparse.Action):
    """An old option spelling that still works and says, once on stderr, what replaced it."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: inspect {option_string} is deprecated; use --slide-backend (on embed, "
              "--backend is the inference backend)", file=sys.stderr)
        setattr(namespace, self.dest, values)


@contextlib.contextmanager
def _native_stderr_hidden(hide: bool) -> Iterator[None]:
    """Hide what C decoders (libtiff, libjpeg, cuCIM) print straight to file descriptor 2.

    The CLI promises one line on stderr for bad input; those libraries print their own
    warnings first. ``--debug`` shows them.
    """
    if not hide:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    from care_scale.exceptions import ConfigError

    if args.demo == bool(args.slide_uri):
        raise ConfigError("inspect: give either SLIDE_URI or --demo")
    with tempfile.TemporaryDirectory(prefix="care-scale-inspect-") as tmp:
        uri = args.slide_uri
        if args.demo:
            from care_scale.synthetic import write_synthetic_slide

            uri = str(Path(tmp) / "demo_slide.tif")
            write_synthetic_slide(uri, width=4096, height=3072, mpp=0.5, seed=0)
        with _native_stderr_hidden(not getattr(args, "debug", False)):
            from care_scale.slides.inspect import inspect_slide

            info = inspect_slide(
                uri, storage_options=storage_options(args.storage_option),
                mpp_override=args.mpp_override, target_mpp=args.target_mpp,
                patch_size=args.patch_size, min_tissue_fraction=args.min_tissue_fraction,
                backend=args.slide_backend, thumbnail=args.thumbnail, tiling=args.tiling,
            )
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"slide        {info['uri']}")
    print(f"size         {info['width']} x {info['height']} px, {info['level_count']} levels "
          f"(downsamples {info['level_downsamples']})")
    print(f"mpp          {info['mpp_x']} x {info['mpp_y']} um/px"
          f"   objective {info['objective_power']}x   vendor {info['vendor']}")
    print(f"backend      {info['backend']}")
    print(f"tiles        {info['tile_count']} tissue tiles of {info['patch_size']} px at "
          f"{info['target_mpp']} um/px, {info['tiling']} tiling (level {info['level_read']}, "
          f"read {info['read_size']} px, mpp from {info['mpp_source']})")
    if info.get("thumbnail"):
        print(f"thumbnail    {info['thumbnail']}")
    return 0
