"""The job's two models as the driver knows them: the registry preset, versions, exports.

The driver needs facts about its models, not the models: the slide encoder's registry preset
(``pipeline.resolve_models``), both versions (the key of "this slide is done"), which run on
untrained weights, CARE's input size, and the ONNX exports the actors on its node load.
Building the models to learn them imports torch: ~1.4 CPU s and ~180 MiB of the driver on
2 cores, in a job whose workers run ONNX Runtime. So once a run has built them, the facts
are kept in the local cache (``$CARE_SCALE_CACHE/models/<key>.json``, beside the exports)
under a key of everything that determines them: both model references as given (names,
overrides), each checkpoint's identity (a local file or folder: its path and every file's
size and modification time), the source of ``care_scale.models`` and the torch version. A
checkpoint whose identity is not cheap to read (``s3://``, ``hf:``) and remote code are never
cached: those runs build the models, as before. The one blind spot is the one ``make``
has: a checkpoint rewritten in place with the same size and modification time.

A re-run (a new slide in a cohort, the next batch of a study) then never imports torch in
the driver where the exports are cached too (``care_scale.artifacts.cached_export_dir``).
``precision: auto`` calibrates on those exports too where the actors run them (fp32 and int8
on ONNX Runtime, ``calibrate.calibration_backend``), and builds the patch encoder only for
what runs on torch (bf16 autocast); feature-file runs read the files with
``care_scale.models`` (torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care_scale.artifacts import cached_export_dir, default_cache_dir, export_cache_key
from care_scale.embed.config import EmbedConfig, ModelRef
from care_scale.exceptions import CareScaleWarning, UntrainedWeightsWarning
from care_scale.storage import is_remote, strip_file_scheme

log = logging.getLogger(__name__)

#: Bumped when what a cached record holds changes (older records are then not read).
FACTS_REVISION = 1


@dataclass(frozen=True)
class ModelFacts:
    """One model as the driver needs it."""

    name: str
    version: str
    trained: bool
    dim: int  # CARE: its input size; a patch encoder: its feature size


@dataclass
class JobModels:
    """Both models of a job (``patch`` is None with feature files), built only on demand.

    ``preset``: the slide encoder's registry entry as ``resolve_models`` applies it (its
    name, the patch encoder it pairs with, tile size, MPP, tiling mode). ``untrained``: the
    :class:`UntrainedWeightsWarning` messages building the models gave, said again when the
    facts come from the cache (so a run says the same either way). ``cached``: whether they
    did.
    """

    config: EmbedConfig
    preset: dict[str, Any]
    care: ModelFacts
    patch: ModelFacts | None
    untrained: list[str] = field(default_factory=list)
    cached: bool = False
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    def care_model(self) -> Any:
        """CARE itself (torch), built on first use."""
        if "care" not in self._built:
            from care_scale.embed.slide_stage import create_slide_encoder

            self._built["care"] = create_slide_encoder(self._resolved())
        return self._built["care"]

    def patch_model(self) -> Any:
        """The patch encoder itself (torch), built on first use."""
        if "patch" not in self._built:
            self._built["patch"] = _create_patch_encoder(self._resolved())
        return self._built["patch"]

    def release(self) -> None:
        """Let go of the torch models built so far, once the driver has made the exports it
        needs: on a cache miss the driver would otherwise hold both for the whole run beside
        the actors' own copies (a later ``care_model()`` / ``patch_model()`` builds again).
        The freed heap goes back to the OS (``calibrate.release_freed_memory``)."""
        if not self._built:
            return
        import gc

        from care_scale.embed.calibrate import release_freed_memory

        self._built.clear()
        gc.collect()  # a module's parameters may sit in reference cycles
        release_freed_memory()

    def care_export(self) -> Path:
        """CARE's ONNX export in the local cache; builds and exports CARE only on a miss."""
        found = cached_export_dir(export_cache_key(self.care.version))
        if found is not None:
            return found
        from care_scale.export import cached_export

        return cached_export(self.care_model())

    def patch_export(self, *, tile_size: int, variant: str | None = None) -> Path:
        """The patch encoder's ONNX export (``variant``: int8) at ``tile_size``, likewise."""
        if self.patch is None:
            raise ValueError("a feature-file run has no patch encoder")
        from care_scale.inference.precision import int8_weight_bits

        bits = int8_weight_bits()  # the cache serves this machine: quantised for its CPU
        found = cached_export_dir(export_cache_key(self.patch.version, tile_size=tile_size,
                                                   variant=variant, int8_weight_bits=bits))
        if found is not None:
            return found
        from care_scale.export import cached_export

        return cached_export(self.patch_model(), tile_size=tile_size, variant=variant,
                             int8_weight_bits=bits)

    def _resolved(self) -> EmbedConfig:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the job's own resolve_models already warned
            return resolve_models(self.config, preset=self.preset)


class TilingPresetWarning(CareScaleWarning):
    """The job tiles slides differently from what the slide encoder was trained on."""


def resolve_models(config: EmbedConfig, *, preset: dict[str, Any] | None = None
                   ) -> EmbedConfig:
    """Fill what the registry decides: the slide encoder an ``hf:`` checkpoint is published
    as, an empty patch encoder name (the one the slide encoder's entry pairs with) and unset
    tiling (the slide encoder's preset). A tiling the user set that differs from the preset
    is kept, with a warning naming both. ``preset``: :func:`registry_preset`'s answer where
    the caller has it (``JobModels.preset``, possibly from the cache: no registry import)."""
    preset = registry_preset(config) if preset is None else preset
    ref = config.slide_encoder
    owner = preset["name"]
    if owner != ref.name:
        log.info("slide encoder %s: %s is its published repository", owner, ref.checkpoint)
        config = dataclasses.replace(config, slide_encoder=dataclasses.replace(ref, name=owner))
    if not config.patch_encoder.name:
        config = dataclasses.replace(config, patch_encoder=dataclasses.replace(
            config.patch_encoder, name=preset["patch_encoder"]))
    tiling = {"patch_size": preset["tile_size"], "target_mpp": preset["mpp"],
              "tiling": preset["tiling"]}
    fill = {}
    for key, value in tiling.items():
        given = getattr(config, key)
        if given is None:
            fill[key] = value
        elif given != value and not config.features:
            msg = (f"{key}={given} differs from {owner}'s preset {key}={value} (the tiling "
                   "it was trained on); embeddings from other tilings are not the published "
                   "model's")
            warnings.warn(msg, TilingPresetWarning, stacklevel=2)
    if config.min_tissue_fraction is None:
        from care_scale.tiling import tiling_mode

        fill["min_tissue_fraction"] = tiling_mode(
            fill.get("tiling", config.tiling)).min_tissue_fraction
    return dataclasses.replace(config, **fill) if fill else config


def registry_preset(config: EmbedConfig) -> dict[str, Any]:
    """The slide encoder's registry entry as ``resolve_models`` applies it (imports the
    registry, so torch): the model an ``hf:`` checkpoint is published as, its patch encoder
    and its tiling preset."""
    from care_scale.models import get_slide_encoder_spec
    from care_scale.models.registry import slide_encoder_for_checkpoint

    ref = config.slide_encoder
    owner = slide_encoder_for_checkpoint(ref.name, ref.checkpoint)
    spec = get_slide_encoder_spec(owner)
    return {"name": owner, "patch_encoder": spec.patch_encoder, "tile_size": spec.tile_size,
            "mpp": spec.mpp, "tiling": spec.tiling}


def job_models(config: EmbedConfig, *, cache_dir: str | os.PathLike | None = None
               ) -> JobModels:
    """The facts of ``config``'s two models: from the cache where a run on this machine
    recorded them for the same key, else by building the models (recorded then)."""
    key = facts_key(config)
    path = None if key is None else Path(cache_dir or default_cache_dir()) / "models" / (
        key + ".json")
    if path is not None:
        hit = _read(path, config)
        if hit is not None:
            for msg in hit.untrained:
                warnings.warn(msg, UntrainedWeightsWarning, stacklevel=2)
            return hit
    made = _build(config)
    if path is not None:
        _write(path, made)
    return made


def facts_key(config: EmbedConfig) -> str | None:
    """The cache key of ``config``'s models, or None where one cannot be had cheaply."""
    refs = [config.slide_encoder] + ([] if config.features else [config.patch_encoder])
    ids = [_checkpoint_identity(r) for r in refs]
    if any(i is None for i in ids):
        return None
    parts = {
        "revision": FACTS_REVISION,
        "refs": [{"name": r.name, "overrides": dict(r.overrides), "checkpoint": i}
                 for r, i in zip(refs, ids, strict=True)],
        "features": bool(config.features),
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _checkpoint_identity(ref: ModelRef) -> Any:
    """A local checkpoint's path and its files' sizes and modification times; "seeded"
    without one; None where it is remote, on a hub or remote code (not cached)."""
    if ref.trust_remote_code:
        return None
    if ref.checkpoint is None:
        return "seeded"
    if is_remote(ref.checkpoint):
        return None
    root = Path(strip_file_scheme(ref.checkpoint)).resolve()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.is_file())
    else:
        return None  # missing: building it gives the error that names it
    stats = [(f, f.stat()) for f in files]
    return [str(root)] + [[str(f.relative_to(root)) if f != root else "", st.st_size,
                           st.st_mtime_ns] for f, st in stats]


def _code_fingerprint() -> str:
    """What the seeded weights and the versions depend on besides the references: the
    source of the model families and checkpoint converters, and torch's version (its RNG)."""
    import care_scale

    here = Path(care_scale.__file__).parent
    h = hashlib.sha256()
    for f in sorted((here / "models").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    try:
        h.update(importlib.metadata.version("torch").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"no torch")
    return h.hexdigest()


def _build(config: EmbedConfig) -> JobModels:
    """Build both models (torch) and read their facts."""
    from care_scale.embed.slide_stage import create_slide_encoder
    from care_scale.models import model_version

    preset = registry_preset(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the job's own resolve_models warns
        cfg = resolve_models(config, preset=preset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntrainedWeightsWarning)
        care = create_slide_encoder(cfg)
        patch = None if cfg.features else _create_patch_encoder(cfg)
    for w in caught:  # said now, as without the recording; the untrained ones also kept
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def facts(model: Any, dim: int) -> ModelFacts:
        return ModelFacts(name=model.name, version=model_version(model),
                          trained=bool(getattr(model, "trained", True)), dim=int(dim))

    return JobModels(
        config=config, preset=preset, care=facts(care, care.config.in_dim),
        patch=None if patch is None else facts(patch, patch.spec.embed_dim),
        untrained=[str(w.message) for w in caught
                   if issubclass(w.category, UntrainedWeightsWarning)],
        _built={"care": care, **({} if patch is None else {"patch": patch})})


def _create_patch_encoder(cfg: EmbedConfig) -> Any:
    """The resolved config's patch encoder (torch)."""
    from care_scale.models import create_patch_encoder

    return create_patch_encoder(cfg.patch_encoder.name, cfg.patch_encoder.checkpoint,
                                storage_options=cfg.storage_options or None)


def _read(path: Path, config: EmbedConfig) -> JobModels | None:
    try:
        rec = json.loads(path.read_text())
        return JobModels(config=config, preset=rec["preset"], care=ModelFacts(**rec["care"]),
                         patch=None if rec["patch"] is None else ModelFacts(**rec["patch"]),
                         untrained=list(rec["untrained"]), cached=True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # torn or foreign: rebuilt
        log.info("model facts %s not used: %s", path, exc)
        return None


def _write(path: Path, models: JobModels) -> None:
    """Atomically (a temp file renamed), so a concurrent run reads all of it or nothing;
    a cache that cannot be written only costs the next run its build."""
    rec = {"preset": models.preset, "care": asdict(models.care),
           "patch": None if models.patch is None else asdict(models.patch),
           "untrained": models.untrained}
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".facts-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.info("model facts not cached at %s: %s", path, exc)
        if tmp:
            Path(tmp).unlink(missing_ok=True)


__all__ = ["JobModels", "ModelFacts", "TilingPresetWarning", "facts_key", "job_models",
           "registry_preset", "resolve_models"]
