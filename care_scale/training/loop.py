"""The training loop of both stages, run by Ray Train's TorchTrainer on every worker.

nanoGPT-style: one readable loop. A *task* (stage I :class:`~care_scale.training.ssl.SSLTask`,
stage II :class:`~care_scale.training.align.AlignTask`) supplies the model, batches and loss;
this module supplies the rest:

- DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU), bf16 autocast on
  GPU, gradient accumulation (no all-reduce on inner micro-steps), gradient clipping;
- learning rate: linear warm-up then cosine decay, per phase (stage II has two);
- checkpoints every ``checkpoint_every`` optimizer steps through ``ray.train.report`` into
  ``<storage_path>/<name>`` (local or s3://), the last ``keep_last`` kept (Ray's
  ``num_to_keep``, plus a driver-side prune of directories a killed run left behind that the
  resumed run's checkpoint manager no longer tracks). A run started
  again with the same name and storage path resumes from its latest checkpoint, restoring
  model, optimizer, teacher, step and metric history; the data order is a pure function of
  (seed, step), so the resumed run continues the same schedule on the same batches;
- metrics: reported to Ray Train and rewritten as ``metrics.csv`` / ``metrics.jsonl`` in the
  run directory at every log step (the history lives in the checkpoint, so a resumed run's
  files hold one continuous curve);
- the final artifact: a CARE checkpoint (``save_checkpoint``: model.safetensors + config.json)
  at ``run.output`` (default ``<storage_path>/<name>/final``), with its model version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from care_scale.config import from_dict, to_dict
from care_scale.exceptions import CareScaleError, CheckpointError, ConfigError
from care_scale.storage import (
    is_remote,
    join,
    redact,
    strip_file_scheme,
    to_fsspec,
    url_to_fs,
    write_text,
)
from care_scale.training.config import Stage1Config, Stage2Config

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


# Each stage: its config class and its task ("module:class", imported when the stage runs).
STAGES: dict[str, tuple[type, str]] = {
    "stage1": (Stage1Config, "care_scale.training.ssl:SSLTask"),
    "stage2": (Stage2Config, "care_scale.training.align:AlignTask"),
}


def _stage(stage: str) -> tuple[type, Any]:
    import importlib

    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; use one of {sorted(STAGES)}")
    cfg_cls, target = STAGES[stage]
    module, name = target.split(":")
    return cfg_cls, getattr(importlib.import_module(module), name)


def lr_at(step: int, *, base: float, min_lr: float, warmup: int, start: int, length: int
          ) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine to ``min_lr``, inside one phase."""
    s = step - start
    warmup = min(warmup, max(length - 1, 0))
    if s < warmup:
        return base * (s + 1) / warmup
    t = (s - warmup) / max(length - warmup, 1)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def run_dir(cfg: Any) -> str:
    return join(cfg.run.storage_path, cfg.run.name)


def output_uri(cfg: Any) -> str:
    return cfg.run.output or join(run_dir(cfg), "final")


def write_metrics(history: list[dict[str, Any]], uri_dir: str,
                  storage_options: dict[str, Any] | None) -> None:
    """(Re)write metrics.jsonl and metrics.csv (union of keys, step first)."""
    if not is_remote(uri_dir):
        os.makedirs(strip_file_scheme(uri_dir), exist_ok=True)
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    keys = ["step"] + [k for k in keys if k != "step"]
    jsonl = "".join(json.dumps(row) + "\n" for row in history)
    csv = ",".join(keys) + "\n" + "".join(
        ",".join("" if row.get(k) is None else str(row[k]) for k in keys) + "\n"
        for row in history)
    # Whole-file replacement: a run killed mid-write never leaves a truncated log behind.
    for name, text in (("metrics.jsonl", jsonl), ("metrics.csv", csv)):
        write_text(join(uri_dir, name), text, storage_options)


def read_metrics(uri_dir: str, storage_options: dict[str, Any] | None = None
                 ) -> list[dict[str, Any]]:
    import fsspec

    path = join(uri_dir, "metrics.jsonl")
    try:
        with fsspec.open(path, "r", **to_fsspec(storage_options, path)) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def _allreduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _save_final(task: Any, cfg: Any) -> str:
    """Write the CARE checkpoint (and stage extras) to the output URI; returns model version."""
    import fsspec
    from safetensors.torch import save

    from care_scale.models import model_version, save_checkpoint

    out = output_uri(cfg)
    opts = cfg.run.storage_options or None
    encoder = task.final_encoder()
    save_checkpoint(encoder, out, storage_options=opts)
    version = model_version(encoder)
    fs_opts = to_fsspec(opts, out)
    for name, (state, meta) in task.final_extras().items():
        with fsspec.open(join(out, f"{name}.safetensors"), "wb", **fs_opts) as fh:
            fh.write(save(state))
        with fsspec.open(join(out, f"{name}.json"), "w", **fs_opts) as fh:
            json.dump(meta, fh)
    with fsspec.open(join(out, "training.json"), "w", **fs_opts) as fh:
        json.dump({"stage": task.stage, "model_version": version, "config": to_dict(cfg)}, fh,
                  default=str)
    return version


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config = {"stage": "stage1"|"stage2", "cfg": <config dict>}``."""
    import ray.train
    import ray.train.torch

    cfg_cls, task_cls = _stage(config["stage"])
    cfg = from_dict(cfg_cls, config["cfg"])
    torch.set_num_threads(max(1, cfg.run.torch_threads))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device()
    task = task_cls(cfg, rank=rank, world=world, device=device)
    # find_unused_parameters: stage II trains one molecular branch per phase.
    model = ray.train.torch.prepare_model(
        task.trainable, parallel_strategy_kwargs={"find_unused_parameters": True})
    task.model = model
    o = cfg.optim
    opt = torch.optim.AdamW(task.param_groups(o.lr), lr=o.lr, weight_decay=o.weight_decay)
    use_amp = bool(cfg.run.use_gpu and o.mixed_precision and device.type == "cuda")

    start_step, history, resumed_from = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            try:
                state = torch.load(os.path.join(d, STATE_FILE), map_location=device,
                                   weights_only=True)
                with open(os.path.join(d, HISTORY_FILE)) as fh:
                    history = json.load(fh)
            except (OSError, RuntimeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"training checkpoint {d} cannot be restored: {exc}") \
                    from None
        task.trainable.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        task.load_extra_state(state["extra"])
        start_step = resumed_from = int(state["step"])
        log.info("rank %d: resumed at step %d", rank, start_step)

    accum = o.grad_accum_steps
    t_last = time.time()
    for step in range(start_step, o.steps):
        _, p_start, p_len = task.phase_of(step)
        lr = lr_at(step, base=o.lr, min_lr=o.min_lr, warmup=o.warmup_steps, start=p_start,
                   length=p_len)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        model.train()
        parts: dict[str, float] = {}
        loss_sum = 0.0
        for micro in range(accum):
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), \
                    torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss, metrics = task.loss(step, micro)
            (loss / accum).backward()
            loss_sum += float(loss) / accum
            for k, v in metrics.items():
                parts[k] = parts.get(k, 0.0) + v / accum
        grad_norm = float(torch.nn.utils.clip_grad_norm_(task.trainable.parameters(),
                                                         o.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_step(step)

        done = step + 1
        is_log = done % cfg.run.log_every == 0 or done == o.steps or done == start_step + 1
        is_ckpt = done % cfg.run.checkpoint_every == 0 or done == o.steps
        if not (is_log or is_ckpt):
            continue
        row = _allreduce_mean({"loss": loss_sum, "grad_norm": grad_norm, **parts}, device)
        now = time.time()
        row = {"step": done, "lr": lr, **row, "sec_per_step": (now - t_last)}
        if resumed_from is not None and done == start_step + 1:
            row["resumed_from"] = resumed_from  # marks the joint of a resumed curve
        t_last = now
        history = [h for h in history if h["step"] < done] + [row]
        if rank == 0:
            write_metrics(history, run_dir(cfg), cfg.run.storage_options or None)
        checkpoint = None
        tmp = None
        if is_ckpt:
            if done == o.steps and rank == 0:
                row["model_version"] = _save_final(task, cfg)
            if rank == 0:
                tmp = tempfile.mkdtemp(prefix="care-ckpt-")
                torch.save({"model": task.trainable.state_dict(), "optimizer": opt.state_dict(),
                            "extra": task.extra_state(), "step": done},
                           os.path.join(tmp, STATE_FILE))
                with open(os.path.join(tmp, HISTORY_FILE), "w") as fh:
                    json.dump(history, fh)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
        if is_ckpt:
            # Every worker reports (Ray Train's barrier); only at checkpoints, because a
            # report waits for the previous checkpoint's registration (~2 s here).
            ray.train.report(row, checkpoint=checkpoint)
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass
class TrainResult:
    stage: str
    run_dir: str
    output: str  # the final CARE checkpoint directory
    model_version: str | None
    history: list[dict[str, Any]]
    seconds: float


def prune_checkpoints(uri_dir: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete ``checkpoint_*`` directories of a finished run that Ray no longer tracks.

    Ray Train keeps ``num_to_keep`` checkpoints of the run it manages, but after a resume the
    checkpoints the killed run wrote (registered or half-uploaded when it died) are not in the
    restored manager's list and stay on storage forever: every kill would leak ``keep_last``
    directories. Only called after ``fit`` returned, so nothing is being written; what the
    snapshot lists (the last ``keep_last``) is kept. Returns the deleted directory names.
    """

    snap_uri = join(uri_dir, "checkpoint_manager_snapshot.json")
    fs, root = url_to_fs(uri_dir, storage_options)
    try:
        with fs.open(f"{root.rstrip('/')}/checkpoint_manager_snapshot.json") as fh:
            snap = json.load(fh)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("not pruning checkpoints: %s unreadable: %s", redact(snap_uri), redact(exc))
        return []
    keep = {r.get("checkpoint_dir_name") for r in snap.get("checkpoint_results", [])}
    latest = snap.get("latest_checkpoint_result") or {}
    keep.add(latest.get("checkpoint_dir_name"))
    if not keep - {None}:
        return []  # an unknown snapshot layout: never delete on a guess
    deleted = []
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint_") and name not in keep and fs.isdir(path):
            fs.rm(path, recursive=True)
            deleted.append(name)
    if deleted:
        log.info("pruned %d untracked checkpoint(s) in %s", len(deleted), redact(uri_dir))
    return sorted(deleted)


def _storage(cfg: Any) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    path = cfg.run.storage_path
    if not is_remote(path):
        return os.path.abspath(path), None
    opts = cfg.run.storage_options or {}
    if not opts:
        return path, None  # Ray resolves s3:// with the standard AWS chain
    # The same fsspec filesystem every other part uses (storage options translated once),
    # handed to Ray Train through pyarrow's fsspec adapter.
    import fsspec
    import pyarrow.fs as pafs

    fs = fsspec.filesystem(path.split("://", 1)[0], **to_fsspec(opts, path))
    return path.split("://", 1)[1], pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def ensure_ray(num_cpus: float | None = None) -> None:
    """Join the cluster of a submitted job (RAY_ADDRESS), else start a local one of our own."""
    # Not `import ray` yet: a local cluster must set its loopback switch first (local_ray).
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init()
    else:
        from care_scale.local_ray import init_local

        init_local(num_cpus=int(max(num_cpus or 0, os.cpu_count() or 1)),
                   include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def preflight(stage: str, cfg: Stage1Config | Stage2Config) -> None:
    """Check the data on the driver first, so bad input is one clear error (TrainingDataError,
    FeatureFileError, TableError) instead of a failed worker deep inside Ray Train."""
    from care_scale.training.data import load_slides_for, model_in_dim, synthetic_slides

    train, holdout = load_slides_for(cfg, train_only=False)
    if not train:
        raise ConfigError("no training slides (data.holdout_fraction leaves none)")
    if stage != "stage2":
        return
    from care_scale.training.align import _as_table, load_molecular
    from care_scale.training.molecular import pair_slides

    cohort = None
    if cfg.data.synthetic:
        _, cohort = synthetic_slides(cfg.data, embed_dim=model_in_dim(cfg.model))
    mol = load_molecular(cfg, cohort)
    ids = [s.slide_id for s in train + holdout]
    for phase in cfg.align.phases:
        samples = mol.rna if phase == "rna" else mol.protein_ids
        uri = mol.rna_uri if phase == "rna" else mol.protein_uri
        pair_slides(ids, _as_table(uri, samples), mapping=mol.mapping,
                    mapping_uri=mol.mapping_uri, allow_unpaired=cfg.molecular.allow_unpaired)


def fit(stage: str, cfg: Stage1Config | Stage2Config) -> TrainResult:
    """Train one stage with Ray Train; resumes when ``<storage>/<name>`` holds a checkpoint."""
    _stage(stage)
    preflight(stage, cfg)
    # Before any `import ray`: a local cluster sets its loopback-only switch first.
    ensure_ray(cfg.run.num_workers * cfg.run.cpus_per_worker)
    import ray.train
    from ray.train.torch import TorchTrainer

    from care_scale.training.process_group import BoundStoreTorchConfig

    storage_path, fs = _storage(cfg)
    t0 = time.time()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage, "cfg": to_dict(cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        # The process group's store listens on rank 0's address only, never on `*`.
        torch_config=BoundStoreTorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_last)),
    )
    from care_scale.training.progress import watch

    try:
        with watch(stage, run_dir(cfg), cfg.optim.steps, cfg.run.storage_options or None):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise CareScaleError(f"training run {redact(run_dir(cfg))} failed: {exc}") from None
    prune_checkpoints(run_dir(cfg), cfg.run.storage_options or None)
    history = read_metrics(run_dir(cfg), cfg.run.storage_options or None)
    version = (result.metrics or {}).get("model_version")
    return TrainResult(stage=stage, run_dir=run_dir(cfg), output=output_uri(cfg),
                       model_version=version, history=history, seconds=time.time() - t0)
