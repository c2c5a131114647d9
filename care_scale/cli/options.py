"""Options several sub-commands share: one spelling, one help text, one parser each.

Error messages name these flags (``MissingMPPError`` says ``--mpp-override``), so every command
that can print such a message takes them; tests/test_cli.py checks that it does.
"""

from __future__ import annotations

import argparse
import re


def add_storage_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="storage option (object_store spelling, e.g. aws_endpoint_url), "
                   "repeatable")


def storage_options(pairs: list[str] | None) -> dict[str, str] | None:
    """``["k=v", ...]`` from ``--storage-option`` -> ``{"k": "v"}`` (None when empty)."""
    from care_scale.exceptions import ConfigError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            # Only the key is echoed: what follows a mistyped separator may be a secret.
            shown = re.split(r"[=:\s]", pair, maxsplit=1)[0]
            raise ConfigError(f"--storage-option {shown!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out or None


def add_mpp_override_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mpp-override", type=float, default=None, metavar="MPP",
                   help="microns per pixel to use instead of the slide's metadata")
