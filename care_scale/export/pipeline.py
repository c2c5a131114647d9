"""Export a registered model to an artifact directory: ONNX, parity, optional TensorRT, manifest.

    from care_scale.export import export_patch_encoder
    result = export_patch_encoder("vit_base_patch16_224", out="s3://bucket/exports/vitb")
    print(result.parity)          # figures; a failed check raises ParityError instead

Everything is written into a local staging directory first and uploaded at the end (manifest
last), so an export that fails parity leaves nothing behind at ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from care_scale.artifacts import (
    INT8_FILE,
    MANIFEST,
    ONNX_FILE,
    Manifest,
    cached_export_dir,
    default_cache_dir,
    export_cache_key,
    sha256_file,
    upload_dir,
    utc_now,
    write_manifest,
)
from care_scale.exceptions import ConfigError, ExportError
from care_scale.export.onnx_export import (
    DEFAULT_OPSET,
    export_patch_encoder_onnx,
    export_slide_encoder_onnx,
    quantize_patch_onnx,
)
from care_scale.export.parity import (
    DEFAULT_TOL,
    ParityReport,
    check_patch_parity,
    check_slide_parity,
    random_slide,
    random_tiles,
    slide_tiles,
)
from care_scale.inference.kinds import build_patch_encoder, build_slide_encoder
from care_scale.storage import redact

log = logging.getLogger(__name__)

#: Parity bound of the int8 variant (relative, L2 per feature and L-inf over the batch):
#: quantisation error, not an export bug, so it is looser than the fp32 bound.
INT8_TOL = 0.1


@dataclass
class ExportResult:
    """What an export wrote and the parity figures it measured."""

    uri: str
    manifest: Manifest
    parity: list[ParityReport] = field(default_factory=list)
    local_dir: Path | None = None  # staging dir (kept only when keep_local=True)

    def summary(self) -> str:
        head = (f"exported {self.manifest.model} ({self.manifest.model_version}) -> "
                f"{redact(self.uri)}")
        lines = [head]
        lines += [f"  parity {r}" for r in self.parity]
        lines += [f"  tensorrt engine {e.file} (sm {e.compute_capability}, TensorRT "
                  f"{e.tensorrt_version}, {e.precision})" for e in self.manifest.engines]
        return "\n".join(lines)


def versions() -> dict[str, str]:
    import onnx
    import torch

    import care_scale

    out = {"torch": torch.__version__, "onnx": onnx.__version__,
           "care_scale": getattr(care_scale, "__version__", "0.1.0")}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def export_patch_encoder(
    model: str | nn.Module,
    *,
    out: str,
    checkpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    tile_size: int | None = None,
    tensorrt: bool = False,
    tensorrt_options: Any = None,
    parity_slide: str | os.PathLike | None = None,
    parity_tiles: int = 8,
    tol: float = DEFAULT_TOL,
    int8: bool = False,
    int8_weight_bits: Literal[7, 8] = 7,
    keep_local: bool = False,
) -> ExportResult:
    """Export a patch encoder to the artifact directory ``out`` (local path or fsspec URI).

    ``int8=True`` also writes ``model.int8.onnx`` (dynamic int8, per-channel weights) with its
    own parity figures against torch fp32 (bound ``INT8_TOL``) and model version ``...+int8``;
    ``int8_weight_bits=8``: full-range weights, closer to fp32, for workers whose CPUs have
    VNNI / AMX-INT8 only (``...+int8w8``; ``quantize_patch_onnx`` says why).

    Parity runs on ``parity_tiles`` random tiles and, with ``parity_slide``, on as many real
    tiles from that slide; both must pass. ``tensorrt=True`` also builds an engine for the GPU
    of this machine (``tensorrt_options``: :class:`care_scale.export.tensorrt.EngineOptions`).
    """
    from care_scale.models import model_version as _model_version

    if tensorrt:
        from care_scale.inference.tensorrt_backend import require_tensorrt

        require_tensorrt()  # fail before minutes of export work, with the reason
    if int8 and int8_weight_bits == 8:
        from care_scale.inference.precision import int8_weight_bits as cpu_int8_weight_bits

        if cpu_int8_weight_bits() != 8:  # its parity check would measure saturated sums
            raise ExportError("int8 with 8-bit weights runs (and is parity-checked) only on "
                              "CPUs with VNNI / AMX-INT8, and this one has neither: export "
                              "it on such a machine, or use 7-bit weights")
    encoder = build_patch_encoder(model, checkpoint, storage_options).eval()
    version = _model_version(encoder)
    tile = int(tile_size or encoder.spec.input_size)
    stage = Path(tempfile.mkdtemp(prefix="care-scale-export-"))
    try:
        info = export_patch_encoder_onnx(encoder, stage / ONNX_FILE, model_version=version,
                                         tile_size=tile, opset=opset)
        reports = [check_patch_parity(info.path, encoder, random_tiles(parity_tiles, tile),
                                      source="random", tol=tol)]
        if parity_slide is not None:
            tiles = slide_tiles(parity_slide, parity_tiles, tile)
            reports.append(check_patch_parity(info.path, encoder, tiles,
                                              source=Path(str(parity_slide)).name, tol=tol))
        for r in reports:
            log.info("parity %s", r)
        manifest = Manifest(
            kind="patch_encoder", model=encoder.spec.name, model_version=version,
            onnx_sha256=sha256_file(info.path), opset=info.opset,
            spec={**encoder.spec.to_dict(), "tile_size": tile},
            inputs=info.inputs, outputs=info.outputs,
            parity={"tol": tol, "reports": [r.as_dict() for r in reports]},
            versions=versions(), trained=bool(getattr(encoder, "trained", False)),
            created_utc=utc_now(),
        )
        if int8:
            q = quantize_patch_onnx(info.path, stage / INT8_FILE, weight_bits=int8_weight_bits)
            q_reports = [check_patch_parity(q.path, encoder, random_tiles(parity_tiles, tile),
                                            source="random", tol=INT8_TOL)]
            if parity_slide is not None:
                q_reports.append(check_patch_parity(q.path, encoder, tiles,
                                                    source=Path(str(parity_slide)).name,
                                                    tol=INT8_TOL))
            for r in q_reports:
                r.name += " int8"
            reports += q_reports
            manifest.variants["int8"] = {
                "file": INT8_FILE, "sha256": sha256_file(q.path),
                "model_version": q.metadata["model_version"],
                "weight_bits": int8_weight_bits,
                "parity": [r.as_dict() for r in q_reports],
            }
        if tensorrt:
            from care_scale.export.tensorrt import EngineOptions, build_engine

            record = build_engine(info.path, stage, model_version=version,
                                  options=tensorrt_options or EngineOptions())
            manifest.engines.append(record)
        write_manifest(stage, manifest)
        upload_dir(stage, out, storage_options=storage_options)
        return ExportResult(out, manifest, reports, stage if keep_local else None)
    finally:
        if not keep_local:
            shutil.rmtree(stage, ignore_errors=True)


def export_slide_encoder(
    model: str | nn.Module = "care",
    *,
    out: str,
    checkpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    tensorrt: bool = False,
    parity_sizes: tuple[int, ...] = (97, 1500),
    parity_slides: list[tuple[Any, Any]] | None = None,
    tol: float = DEFAULT_TOL,
    keep_local: bool = False,
) -> ExportResult:
    """Export CARE to the artifact directory ``out`` with a dynamic number of patches.

    Parity runs on random slides of each size in ``parity_sizes`` (two sizes at least, which
    checks the dynamic axis) and on ``parity_slides`` ((features, grid) pairs, e.g. features of
    real tiles) when given. TensorRT is not offered for CARE: its graph is data dependent
    (NonZero, sorts) and small next to the patch encoder; it runs in ONNX Runtime (CUDA EP on
    a GPU).
    """
    from care_scale.models import model_version as _model_version

    if tensorrt:
        raise ConfigError("TensorRT engines are built for the patch encoder only; CARE runs "
                          "in ONNX Runtime (CUDA execution provider on a GPU)")
    if len(set(parity_sizes)) < 2:
        raise ConfigError("parity_sizes needs two different patch counts (dynamic axis check)")
    care = build_slide_encoder(model, checkpoint, storage_options).eval()
    version = _model_version(care)
    stage = Path(tempfile.mkdtemp(prefix="care-scale-export-"))
    try:
        info = export_slide_encoder_onnx(care, stage / ONNX_FILE, model_version=version,
                                         opset=opset)
        cases = [random_slide(n, care.config.in_dim, seed=i)
                 for i, n in enumerate(parity_sizes)]
        reports = check_slide_parity(info.path, care, cases, source="random", tol=tol)
        if parity_slides:
            reports += check_slide_parity(info.path, care, parity_slides, source="given",
                                          tol=tol)
        for r in reports:
            log.info("parity %s", r)
        spec = getattr(care, "spec", None)
        manifest = Manifest(
            kind="slide_encoder", model=getattr(care, "name", "care"), model_version=version,
            onnx_sha256=sha256_file(info.path), opset=info.opset,
            spec={"config": json.loads(info.metadata["config"]),
                  "in_dim": care.config.in_dim, "embed_dim": care.config.hidden_dim,
                  "patch_encoder": getattr(spec, "patch_encoder", None)},
            inputs=info.inputs, outputs=info.outputs,
            parity={"tol": tol, "reports": [r.as_dict() for r in reports]},
            versions=versions(), trained=bool(getattr(care, "trained", False)),
            created_utc=utc_now(),
        )
        write_manifest(stage, manifest)
        upload_dir(stage, out, storage_options=storage_options)
        return ExportResult(out, manifest, reports, stage if keep_local else None)
    finally:
        if not keep_local:
            shutil.rmtree(stage, ignore_errors=True)


def cached_export(model: nn.Module, *, tile_size: int | None = None,
                  variant: str | None = None, int8_weight_bits: Literal[7, 8] | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """The artifact directory of ``model`` (a patch encoder or CARE) in the local export cache,
    exporting it on first use: the one place that exports on the fly.

    Used on the driver (the embedding job's export for the encoder actors) and by
    :func:`care_scale.export.create_patch_backend` where a kind runs from artifacts and none
    were given. Keyed by model version (and, for a patch encoder, tile size, graph revision
    and ``variant``), so a changed checkpoint never reuses a stale graph. The directory is a
    complete artifact directory (manifest, parity-checked). Concurrent workers may export the
    same key; each writes its own temp dir and the first rename wins (the others' identical
    results are dropped). The cache serves this machine, so an int8 variant is quantised for
    its CPU (``int8_weight_bits`` None: ``inference.precision.int8_weight_bits``).
    """
    from care_scale.inference.precision import int8_weight_bits as cpu_int8_weight_bits
    from care_scale.models import model_version as _model_version

    bits = cpu_int8_weight_bits() if int8_weight_bits is None else int8_weight_bits
    version = _model_version(model)
    slide = hasattr(model, "config")  # CARE; patch encoders carry a spec only
    if not slide and variant not in (None, "int8"):
        raise ConfigError(f"unknown ONNX variant {variant!r}; known: int8")
    tile = None if slide else int(tile_size or model.spec.input_size)
    key = export_cache_key(version, tile_size=tile, variant=None if slide else variant,
                           int8_weight_bits=bits)
    found = cached_export_dir(key, cache_dir)
    if found is not None:
        return found
    root = Path(cache_dir or default_cache_dir()) / "onnx"
    target = root / key
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    try:
        if slide:
            export_slide_encoder(model, out=str(tmp), parity_sizes=(97, 400))
        else:
            export_patch_encoder(model, out=str(tmp), tile_size=tile, parity_tiles=4,
                                 int8=variant == "int8", int8_weight_bits=bits)
        try:
            os.rename(tmp, target)
        except OSError:  # another worker got there first; its export is the same
            if not (target / MANIFEST).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s into the cache %s", key, target)
    return target
