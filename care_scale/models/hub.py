"""``hf:ORG/NAME[@revision]`` checkpoint URIs, resolved offline from the Hugging Face cache.

Users download published weights on a machine with internet access (``huggingface-cli
download`` or ``snapshot_download``) and copy the cache; the job never calls the network. This
module reads the cache layout ``huggingface_hub`` writes, without importing it:

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--ORG--NAME/
        refs/main                  -> a commit hash
        snapshots/<commit>/...     -> the files (links into blobs/)

``@revision`` is a branch or tag (read from ``refs/``) or a commit hash (a snapshot folder
directly); without it, ``main``. Resolving sets ``HF_HUB_OFFLINE=1`` for this process, so a
library that would otherwise reach the hub (transformers, huggingface_hub) stays offline too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from care_scale.exceptions import CheckpointError

PREFIX = "hf:"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hf_uri(uri: str) -> bool:
    return uri.startswith(PREFIX)


def parse_hf_uri(uri: str) -> tuple[str, str]:
    """``hf:ORG/NAME[@revision]`` -> (repo id, revision)."""
    if not is_hf_uri(uri):
        raise CheckpointError(f"{uri}: not an hf: checkpoint URI")
    body = uri[len(PREFIX):]
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo):
        raise CheckpointError(f"{uri}: expected hf:ORG/NAME[@revision]")
    return repo, revision or "main"


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps snapshots, by its own environment variables."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def fetch_hint(repo: str, files: tuple[str, ...], revision: str = "main") -> str:
    """The command that fetches ``files`` of ``repo`` on a machine with internet access."""
    rev = "" if revision == "main" else f" --revision {revision}"
    names = " ".join(files)
    return f"huggingface-cli download {repo}{rev} {names}".rstrip()


def resolve_hf_snapshot(uri: str, *, files: tuple[str, ...] = ()) -> Path:
    """The local snapshot folder of ``uri``; every name in ``files`` must be in it.

    A missing repository, revision or file is one :class:`CheckpointError` that names the
    cache searched, the files needed and the command that fetches them.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    repo, revision = parse_hf_uri(uri)
    cache = hub_cache_dir()
    root = cache / ("models--" + repo.replace("/", "--"))
    need = ", ".join(files) if files else "its weights"
    hint = (f"no network is used: on a machine with internet access run "
            f"`{fetch_hint(repo, files, revision)}` and copy {root.name} into {cache} "
            "(or set HF_HUB_CACHE / HF_HOME to where it is)")
    if _COMMIT.match(revision):
        commit = revision
    else:
        ref = root / "refs" / revision
        if not ref.is_file():
            where = "repository" if not root.is_dir() else f"revision {revision!r}"
            raise CheckpointError(f"{uri}: {where} not in the Hugging Face cache {cache} "
                                  f"(needs {need}); {hint}")
        commit = ref.read_text().strip()
    snap = root / "snapshots" / commit
    if not snap.is_dir():
        raise CheckpointError(f"{uri}: snapshot {commit[:12]} not in {root} (needs {need}); "
                              f"{hint}")
    missing = [f for f in files if not (snap / f).exists()]
    if missing:
        raise CheckpointError(f"{uri}: snapshot {snap} lacks {', '.join(missing)}; {hint}")
    return snap


def local_snapshot(repo: str, files: tuple[str, ...] = (), revision: str = "main") -> Path | None:
    """The snapshot folder of ``repo`` holding ``files``, or None (no error, no network)."""
    try:
        return resolve_hf_snapshot(f"{PREFIX}{repo}@{revision}", files=files)
    except CheckpointError:
        return None


__all__ = ["fetch_hint", "hub_cache_dir", "is_hf_uri", "local_snapshot", "parse_hf_uri", "resolve_hf_snapshot"]
