#!/usr/bin/env bash
# TRIDENT (mahmoodlab) in a virtual environment of its own, for benchmarks/peer_trident/run.py.
#
#   PEER_VENV=/tmp/peer-trident-venv TRIDENT_SRC=git+https://github.com/mahmoodlab/TRIDENT \
#       bash benchmarks/peer_trident/install.sh
#
# PEER_VENV    where the venv goes (default /tmp/peer-trident-venv; never inside the repo).
# TRIDENT_SRC  what pip installs TRIDENT from: a pip URL (default, its public source), a
#              source folder, or a git directory without a work tree (its HEAD is exported).
# PYTHON       the interpreter the venv is made from (TRIDENT wants 3.10 or 3.11).
# PEER_PIP_CLEAN  1 (default): pip reads no pip.conf and no PIP_FIND_LINKS, so it installs
#              from PyPI what a clean machine gets. A local wheel folder holding the
#              torch-2.13.0+cpu wheel would otherwise satisfy "torch==2.13.0", and PyPI's
#              torchvision 0.28.0 is built against the default torch build, not that one
#              ("operator torchvision::nms does not exist"). 0: use this machine's pip config.
#
# Pins: timm 0.9.16 (TRIDENT's own pin) and torchvision 0.28.0 beside PyPI's default torch
# 2.13.0 build (not the CPU-only wheel), installed before TRIDENT so its unpinned torch
# requirement is already met. No weights are downloaded: run.py gives TRIDENT a random timm
# model through its custom-encoder path and segments with Otsu.
set -euo pipefail

PEER_VENV=${PEER_VENV:-/tmp/peer-trident-venv}
TRIDENT_SRC=${TRIDENT_SRC:-git+https://github.com/mahmoodlab/TRIDENT}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/../.." && pwd)

case "$(cd "$(dirname "$PEER_VENV")" 2>/dev/null && pwd)/" in
  "$REPO"/*) echo "PEER_VENV must be outside the repository ($REPO)" >&2; exit 2 ;;
esac

"$PYTHON" -m venv "$PEER_VENV"
PIP=("$PEER_VENV/bin/python" -m pip)
if [ "${PEER_PIP_CLEAN:-1}" = 1 ]; then
  PIP=(env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT
       PIP_CONFIG_FILE=/dev/null "${PIP[@]}")
fi
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install "torch==2.13.0" "torchvision==0.28.0" "timm==0.9.16"

src=$TRIDENT_SRC
if [ -d "$src" ] && [ ! -e "$src/pyproject.toml" ] && git --git-dir "$src" rev-parse HEAD >/dev/null 2>&1; then
  tree=$(mktemp -d)
  trap 'rm -rf "$tree"' EXIT
  git --git-dir "$src" archive HEAD | tar -x -C "$tree"
  echo "TRIDENT from $src at $(git --git-dir "$src" rev-parse --short HEAD)"
  src=$tree
fi
"${PIP[@]}" install "$src" "timm==0.9.16"
"$PEER_VENV/bin/python" - <<'PY'
import timm, torch, torchvision, trident  # noqa: F401  (torchvision's ops load with torch)

print("trident ok; timm", timm.__version__, "torch", torch.__version__,
      "torchvision", torchvision.__version__)
if "+cpu" in torch.__version__:
    raise SystemExit("got the CPU-only torch wheel; PyPI's default build was wanted")
PY
