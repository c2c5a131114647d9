"""The CARE stage of the embedding job: one slide's features reach one actor whole.

How the features of a slide get there (the choice)
--------------------------------------------------
The decode task that tiles a slide sends its batches to the patch-encoder actors and gets
the features back (``patch_stage``), so it ends up holding all of the slide's features; it
writes them as **shards** under the run's staging folder in the warehouse
(``<wh>/_staging/<run_id>/``, so every node of a cluster reaches it, local or ``s3://``;
``shards``) and yields one row per slide with their URIs. The driver hands those to a
:class:`SlideEncoderActor`, which reads them, runs CARE, writes the slide's rows as Parquet
data files into the tables and returns their metadata
(:class:`care_scale.warehouse.DataFile`). The driver commits.

What the driver handles per slide: one stream row of a few hundred bytes, one actor call,
the files' metadata. It receives no feature, no pixel, no row.

Alternatives rejected:

- CARE in the driver (the first design): 0.30 CPU-ms per tile with the paper-size CARE, the
  driver received N x 768 float32 per slide and wrote every row: one driver capped a cluster
  near 3,000 tiles/s (issue 11's measurement; ``benchmarks/bench_driver.py`` measures it).
- Grouping in Ray Data (``groupby("slide_id").map_groups``): an all-to-all exchange that
  waits for the whole dataset, so nothing would stream, and memory would grow with the cohort.
- Handing the features to the slide-encoder actor as an object reference (no shard): the
  object belongs to the decode task's worker, which Ray Data may retire once the task ends,
  taking the features with it; a shard survives that, and makes the CARE stage independent
  of where decode and encoder ran. A shard costs one write and one read per slide (768
  float32 per tile: 3 KB, against 786 KB of pixels per 512 px tile that were decoded).

With precomputed features (``--features``) there is nothing to decode or encode: the actor
reads the user's feature file itself, so Ray Data is not involved at all.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from care_scale.artifacts import MANIFEST
from care_scale.embed.config import EmbedConfig
from care_scale.embed.results import (
    STAGE_FEATURES,
    STAGE_SLIDE_ENCODER,
    RowContext,
    build_result,
    feature_file_meta,
)
from care_scale.embed.shards import read_shards, remove_uris
from care_scale.exceptions import CareScaleError
from care_scale.storage import redact

log = logging.getLogger(__name__)
# --------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a slide-encoder actor returns for one slide (all of it small)."""

    slide_id: str
    files: list[Any] = field(default_factory=list)  # DataFile
    dims: dict[str, int] = field(default_factory=dict)
    tiles: int = 0
    error: tuple[str, str, str] | None = None  # stage, exception class, message


def create_slide_encoder(config: EmbedConfig) -> Any:
    """CARE as the config names it (checkpoint or seeded random weights), in eval mode."""
    from care_scale.models import create_slide_encoder as _create

    model = _create(
        config.slide_encoder.name,
        config.slide_encoder.checkpoint,
        storage_options=config.storage_options or None,
        trust_remote_code=config.slide_encoder.trust_remote_code,
        **config.slide_encoder.overrides,
    )
    return model.eval()


class SlideEncoderActor:
    """Holds CARE (loaded once) and writes each slide's rows as data files.

    ``local_export``: the driver's ONNX export of exactly this CARE
    (``pipeline.export_care_for_local_actors``); where this actor's node has it, CARE runs on
    ONNX Runtime and the actor never imports torch (~1.4 CPU s and ~180 MiB of a worker on
    2 cores; the graph is also ~1.8x faster than torch eager on the CPU, and its export
    checked identical regions and ROI and embeddings within the parity bound). Otherwise
    (another node, a GPU actor, no export) it builds the torch model from the config.
    """

    def __init__(self, config: EmbedConfig, ctx: RowContext, local_export: str | None = None):
        from care_scale.warehouse import Warehouse

        self.config, self.ctx = config, ctx
        threads = max(1, config.concurrency.slide_encoder_threads)
        if local_export and os.path.isfile(os.path.join(local_export, MANIFEST)):
            from care_scale.inference.kinds import load_slide_backend

            self.care = load_slide_backend("onnxruntime", config.slide_encoder.name,
                                           artifacts=local_export, device="cpu",
                                           threads=threads)
            self.kind = "onnxruntime"
        else:
            import torch

            torch.set_num_threads(threads)
            self.care = create_slide_encoder(config)
            self.kind = "torch"
        self.opts = config.storage_options or None
        self.wh = Warehouse(config.warehouse, storage_options=self.opts)
        if config.overlays:
            # Imported while the first slide is still being decoded, not on its critical path.
            import PIL.ImageDraw  # noqa: F401
            import shapely  # noqa: F401

    def info(self) -> dict[str, Any]:
        """What CARE runs on in this actor (recorded in the runs table's counts)."""
        return {"backend": self.kind,
                "threads": max(1, self.config.concurrency.slide_encoder_threads)}

    def encode_shards(self, src_row: dict[str, Any], meta: dict[str, Any], shards: list[str],
                      backend: str) -> Outcome:
        """CARE on one slide whose features lie in ``shards``; the shards are removed."""
        try:
            coords, tissue, feats = read_shards(shards, self.opts)
        except (OSError, ValueError) as exc:
            msg = f"reading staged features: {redact(exc)[:2000]}"
            return Outcome(src_row["slide_id"],
                           error=(STAGE_SLIDE_ENCODER, type(exc).__name__, msg))
        out = self._encode(src_row, meta, coords, tissue, feats, backend, STAGE_SLIDE_ENCODER)
        try:
            remove_uris(shards, self.opts)
        except OSError:
            pass  # left for `care-scale tables vacuum` (staging)
        return out

    def encode_feature_file(self, src_row: dict[str, Any]) -> Outcome:
        """CARE on a precomputed patch-feature file (.h5 / .parquet / CARE .npy)."""
        from care_scale.models import read_patch_features
        from care_scale.models.features import file_step

        try:
            pf = read_patch_features(src_row["uri"], storage_options=self.opts)
            if len(pf.features) == 0:
                from care_scale.exceptions import FeatureFileError

                raise FeatureFileError(f"{redact(src_row['uri'])}: holds no patch features")
            step = file_step(pf)
            coords = np.asarray(pf.coords, np.int64)
            meta = feature_file_meta(src_row, coords, pf.patch_size_level0, step,
                                     self.config.target_mpp)
            feats = np.asarray(pf.features, np.float32)
        except (CareScaleError, OSError, ValueError, KeyError) as exc:
            return Outcome(src_row["slide_id"], error=(STAGE_FEATURES, type(exc).__name__,
                                                       redact(exc)[:2000]))
        return self._encode(src_row, meta, coords, np.ones(len(coords), np.float32), feats,
                            "features", STAGE_SLIDE_ENCODER)

    def _encode(self, src_row, meta, coords, tissue, feats, backend, stage) -> Outcome:
        from care_scale.embed.sources import SlideSource
        from care_scale.warehouse.writer import result_dims

        sid = src_row["slide_id"]
        try:
            result = build_result(self.care, self.ctx, SlideSource.from_row(src_row), meta,
                                  coords, tissue, feats, backend=backend)
            files = self.wh.write_files([result])
        except (CareScaleError, OSError) as exc:
            return Outcome(sid, error=(stage, type(exc).__name__, redact(exc)[:2000]))
        if self.config.overlays and backend != "features":  # a feature file has no thumbnail
            self._overlays(result)
        return Outcome(sid, files=files, dims=result_dims(result), tiles=len(coords))

    def _overlays(self, result: Any) -> None:
        """``--overlays``: the regions' GeoJSON and pictures beside the decode task's
        thumbnail; a failure costs the slide its pictures, not its embedding."""
        from care_scale.overlays.files import finish_from_folder, overlay_folder

        try:
            finish_from_folder(overlay_folder(self.config.warehouse, result.slide_id),
                               result.slide, result.regions, self.opts)
        except (CareScaleError, OSError, ValueError) as exc:
            log.warning("%s: overlays not written: %s", result.slide_id, redact(exc))


# --------------------------------------------------------------------------------------------
# Driver side: the actor pool
# --------------------------------------------------------------------------------------------


class SlideStage:
    """A fixed pool of :class:`SlideEncoderActor` with a bounded queue per actor.

    ``submit`` blocks while every actor has ``max_in_flight`` slides queued, which
    back-pressures the driver's pull from Ray Data (and so the whole stream) when CARE is
    the slowest stage. Outcomes come back from :meth:`poll` in completion order.
    """

    def __init__(self, config: EmbedConfig, ctx: RowContext, *, max_in_flight: int = 2,
                 local_export: str | None = None):
        import ray

        from care_scale.embed.actor_options import actor_options

        c = config.concurrency
        # A crashed actor restarts; the slide it held is retried once.
        opts = actor_options(num_cpus=c.num_cpus_per_slide_actor,
                             num_gpus=c.num_gpus_per_slide_actor,
                             resources=c.slide_encoder_resources, max_restarts=2,
                             max_task_retries=1)
        cls = ray.remote(SlideEncoderActor).options(**opts)
        self.actors = [cls.remote(config, ctx, local_export)
                       for _ in range(c.slide_encoder_actors)]
        self.max_in_flight = max_in_flight
        self.in_flight: dict[Any, tuple[str, int]] = {}  # ref -> (slide_id, actor index)
        self.load = [0] * len(self.actors)
        self.done: deque[Outcome] = deque()

    def submit(self, method: str, slide_id: str, *args: Any) -> None:
        while min(self.load) >= self.max_in_flight:
            self._wait(timeout=None)
        i = int(np.argmin(self.load))
        ref = getattr(self.actors[i], method).remote(*args)
        self.in_flight[ref] = (slide_id, i)
        self.load[i] += 1

    def _wait(self, timeout: float | None) -> None:
        """Collect finished calls: at least one (``timeout=None``), or whatever is ready."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not self.in_flight:
            return
        refs = list(self.in_flight)
        ready, _ = ray.wait(refs, num_returns=1 if timeout is None else len(refs),
                            timeout=timeout)
        for ref in ready:
            sid, i = self.in_flight.pop(ref)
            self.load[i] -= 1
            try:
                self.done.append(ray.get(ref))
            except (RayActorError, RayTaskError) as exc:
                self.done.append(Outcome(sid, error=(
                    STAGE_SLIDE_ENCODER, "WorkerCrashedError",
                    f"the slide-encoder actor failed on this slide: {redact(exc)[:1500]}")))

    def poll(self) -> list[Outcome]:
        """Outcomes finished so far (does not wait)."""
        self._wait(timeout=0)
        out = list(self.done)
        self.done.clear()
        return out

    def drain(self) -> list[Outcome]:
        """Wait for every submitted slide."""
        while self.in_flight:
            self._wait(timeout=None)
        out = list(self.done)
        self.done.clear()
        return out

    def info(self) -> list[dict[str, Any]]:
        """Each actor's :meth:`SlideEncoderActor.info` (what CARE ran on)."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get([a.info.remote() for a in self.actors], timeout=30)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return []

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


__all__ = ["Outcome", "SlideEncoderActor", "SlideStage", "create_slide_encoder"]
