"""The patch-encoder stage: a pool of Ray actors, each holding one patch backend, called
directly by the decode tasks. Tiles and features travel between workers; the driver only
creates the actors and hands their handles to the decode tasks.

How tiles reach the encoders (the choice)
-----------------------------------------
A decode task tiles one slide, sends its decoded tiles to an encoder actor in batches of
``encode_batch_size`` (``actor.encode.remote(tiles)``: the batch goes into the object store,
owned by the decode task, on its node), keeps at most ``concurrency.encode_in_flight`` batches in flight while it
decodes the next one, and gathers the features that come back into the slide's shards
(:mod:`care_scale.embed.shards`). When the slide is done it yields one row: the shard URIs, the
tile count and the slide's metadata. Ray Data streams those rows (one per slide) to the
driver, which hands each to a slide-encoder actor. Per slide the driver handles one Ray Data
block of a few hundred bytes and one actor call: its cost grows with slides, not tiles.

Load balancing: each decode task starts at a random actor and goes round the pool, one
batch per actor in turn; an actor serves calls in arrival order. Back-pressure: a decode task
waits when its own batches in flight exceed the bound, so pixels in the object store are at
most ``decode_tasks x (encode_in_flight + 1)`` batches. Batches stay in flight from one slide
to the next, so the encoders do not wait while a decode task opens the next slide.

Alternatives rejected (``benchmarks/bench_driver.py``, 2-core AMD EPYC, AVX2 + AVX-512):

- Ray Data's actor pool as a second ``map_batches`` stage (the design before this one): every
  tile batch is a block that the driver's streaming executor schedules twice (decode output,
  encoder task) and whose object reference the driver owns. Its driver paid 0.033-0.056
  CPU-ms per tile (one driver kept up with 17,000-28,000 tiles/s), above the 0.02 goal even
  with batches of 256; our own driver code was ~0.005 of it (py-spy), the rest Ray Data's
  executor and Ray core in the driver. This design: no per-tile term within the noise
  (6 CPU-ms per slide and ~30 per second of run, see the README).
- Decode inside the encoder actor (one process per GPU): no overlap of decode and inference
  unless the actor runs threads, and a GPU node's decode CPUs could serve only its own GPU.
- Mixed-slide batches (what Ray Data's batching gave): full batches for the GPU, but a slide's
  features then land on many actors and must be regrouped; here a batch is one slide's, and
  only each slide's last batch is short.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import deque
from typing import Any

import numpy as np

from care_scale.artifacts import MANIFEST
from care_scale.embed.config import EmbedConfig
from care_scale.exceptions import CareScaleError, ConfigError
from care_scale.storage import redact


def create_patch_backend(config: EmbedConfig, *, device: str | None = None,
                         threads: int | None = None) -> Any:
    """The patch backend of one encoder actor: ``__call__(uint8 (B,H,W,3)) -> float32 (B,D)``,
    ``.kind`` (what "auto" chose), ``.embed_dim``, ``.model_version``, ``.threads``. Exports on
    the fly (into this node's cache) where the kind needs artifacts and the config names none.
    ``threads``: intra-op threads (default ``concurrency.torch_threads``; unset there too: the
    runtime's own default)."""
    from care_scale.export import create_patch_backend as _create

    return _create(
        config.backend,
        config.patch_encoder.name,
        checkpoint=config.patch_encoder.checkpoint,
        artifacts=config.artifacts,
        storage_options=config.storage_options or None,
        device=device,
        tile_size=config.patch_size,
        threads=threads if threads is not None else config.concurrency.torch_threads,
        precision=config.precision,
    )


class PatchEncoder:
    """One patch backend per actor; encodes the tile batches it is sent (one slide's tiles,
    up to ``encode_batch_size`` of them; larger calls in chunks of that size).

    ``local_export``: the driver's ONNX export of exactly these weights
    (``pipeline.export_for_local_actors``); used when this actor's node has it, which spares
    the actor importing torch to build the model. A node that joined later does not have it
    and resolves the backend from the config as usual. ``actors_on_node``: how many encoder
    actors share this actor's node, where the driver knows (one node); the intra-op threads
    are then a share of its cores (``node_threads.intra_op_threads``). ``patch_version``:
    the version the run's rows carry; an int8 graph must have it (a node whose CPU made
    another int8 graph, 7- instead of 8-bit weights, would write other embeddings under it).
    """

    def __init__(self, config: EmbedConfig, local_export: str | None = None,
                 actors_on_node: int | None = None, patch_version: str | None = None):
        if local_export and os.path.isfile(os.path.join(local_export, MANIFEST)):
            config = dataclasses.replace(
                config, artifacts=local_export,
                patch_encoder=dataclasses.replace(config.patch_encoder, checkpoint=None))
        import time

        from care_scale.embed.node_threads import assigned_cpus, intra_op_threads
        from care_scale.timeline import TileCounter

        self.marks = {"actor_init": time.time()}  # this actor's phases (care_scale.timeline)

        # An actor without a reserved GPU cannot use one (Ray hides the devices from it).
        device = "cuda" if config.concurrency.num_gpus_per_actor > 0 else "cpu"
        self.cpus = assigned_cpus()
        threads = intra_op_threads(config.concurrency.torch_threads, self.cpus,
                                   actors_on_node=actors_on_node)
        self.backend = create_patch_backend(config, device=device, threads=threads)
        if (config.precision == "int8" and patch_version
                and self.backend.model_version != patch_version):
            raise ConfigError(f"this node's int8 patch encoder is "
                              f"{self.backend.model_version}, the run's is {patch_version} "
                              "(this node's CPU quantises differently, VNNI or not): give "
                              "every node one graph with care-scale export patch-encoder "
                              "--int8 and --set artifacts=...")
        self.embed_dim = int(self.backend.embed_dim)
        self.kind = str(self.backend.kind)
        self.batch_size = config.encode_batch_size
        self.marks["actor_ready"] = time.time()
        self.counter = TileCounter()  # tiles encoded over time, for the report's plot

    def info(self) -> dict[str, Any]:
        """What this actor runs with: backend kind, the CPUs Ray assigned it and the
        intra-op threads its backend reports (recorded in the runs table's counts), and its
        timeline marks (ready, first and last tile encoded) and its tiles over time."""
        return {"backend": self.kind, "cpus": self.cpus, "threads": self.backend.threads,
                "timeline": dict(self.marks), "tiles_over_time": self.counter.samples}

    def encode(self, tiles: np.ndarray) -> tuple[np.ndarray | None, str, tuple[str, str] | None]:
        """``(features, backend kind, None)``, or ``(None, kind, (class, message))`` when the
        backend fails on these tiles (the slide fails, the actor stays)."""
        try:
            feats = [self.backend(np.ascontiguousarray(tiles[i:i + self.batch_size]))
                     for i in range(0, len(tiles), self.batch_size)]
            self._mark_encoded()
            self.counter.add(len(tiles))
            return np.concatenate(feats).astype(np.float32, copy=False), self.kind, None
        except (CareScaleError, RuntimeError, ValueError) as exc:
            return None, self.kind, (type(exc).__name__, redact(exc)[:2000])


    def _mark_encoded(self) -> None:
        import time

        now = time.time()
        self.marks.setdefault("first_encoded", now)
        self.marks["last_encoded"] = now


class EncoderPool:
    """Driver side: the encoder actors, created once per job (they load their backend while
    the first slides are opened and tiled) and killed at its end."""

    def __init__(self, config: EmbedConfig, *, local_export: str | None = None,
                 one_node: bool = False, patch_version: str | None = None):
        import ray

        from care_scale.embed.actor_options import actor_options

        c = config.concurrency
        # A crashed actor restarts; calls in flight are retried on it.
        opts = actor_options(num_cpus=c.num_cpus_per_actor, num_gpus=c.num_gpus_per_actor,
                             resources=c.encoder_resources, max_restarts=3, max_task_retries=3)
        cls = ray.remote(PatchEncoder).options(**opts)
        on_node = c.encoder_actors if one_node else None
        self.actors = [cls.remote(config, local_export, on_node, patch_version)
                       for _ in range(c.encoder_actors)]

    def info(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Each live actor's :meth:`PatchEncoder.info` ([] for actors that do not answer)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return list(ray.get([a.info.remote() for a in self.actors], timeout=timeout_s))
        except (GetTimeoutError, RayActorError):
            return []

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class Router:
    """Decode-task side: sends tile batches round the encoder pool with at most
    ``max_in_flight`` outstanding (across slides), and hands back each batch's outcome as
    ``(tag, features | None, backend kind, None | (exception class, message))``."""

    def __init__(self, actors: list[Any], *, max_in_flight: int):
        self.actors = actors
        self.max_in_flight = max(1, max_in_flight)
        self.next = random.randrange(len(actors))
        self.in_flight: deque[tuple[Any, Any]] = deque()  # (ref, what the caller attached)

    def submit(self, tiles: np.ndarray, tag: Any) -> list[tuple]:
        """Send a batch; returns the batches finished meanwhile (blocks while the bound is
        exceeded)."""
        actor = self.actors[self.next % len(self.actors)]
        self.next += 1
        self.in_flight.append((actor.encode.remote(tiles), tag))
        done = []
        while len(self.in_flight) > self.max_in_flight:
            done.append(self._take())
        return done

    def drain(self) -> list[tuple]:
        return [self._take() for _ in range(len(self.in_flight))]

    def _take(self) -> tuple:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ref, tag = self.in_flight.popleft()
        try:
            return (tag, *ray.get(ref))
        except (RayActorError, RayTaskError) as exc:  # died beyond its restarts
            return tag, None, "", ("WorkerCrashedError",
                                   f"the patch-encoder actor failed: {redact(exc)[:1500]}")


__all__ = ["EncoderPool", "PatchEncoder", "Router", "create_patch_backend"]
