"""ONNX export of the patch encoder (dynamic batch) and the CARE slide encoder (dynamic N).

Exporter choice: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. CARE's graph is
data dependent (top-k candidates, argmax assignment, a number of regions that depends on the
input); the tracer records those as ONNX TopK/ArgMax/ScatterND/NonZero with symbolic shapes,
whereas ``torch.export`` would need every unbacked size guarded by hand. The patch encoder is a
plain ViT that either exporter handles; we use one path for both.

Graph contracts (what a runtime feeds and gets):

- patch encoder: ``tiles`` uint8 ``(batch, T, T, 3)`` RGB, ``T`` = the tile size chosen at export
  (default the encoder's input size) -> ``features`` float32 ``(batch, embed_dim)``. Resize to
  the encoder's input size and normalisation are inside the graph, as in the torch module. The
  first op is the uint8 -> float Cast, because TensorRT only accepts uint8 inputs that feed a
  Cast directly.
- slide encoder (CARE, one slide per call): ``features`` float32 ``(N, in_dim)`` and ``grid``
  int64 ``(N, 2)`` (integer grid positions, as ``coords_to_grid`` makes them) -> the outputs in
  ``care_scale.artifacts.SLIDE_OUTPUTS``, with ``N`` and the number of regions ``R`` dynamic. CARE's forward is
  written without Python control flow on data (groups by sort + nonzero, exact integer ranking
  keys for top-k), so the tracer records TopK / ArgMax / ScatterElements / NonZero / masked
  attention and no graph surgery beyond the wrapper below is needed.

Every file carries ``metadata_props`` (``care_scale.*`` keys, values are strings; lists are
JSON) so a file found on its own still says which model, version, input size, normalisation,
MPP and tile size it expects and what it returns.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from care_scale.artifacts import INT8_VERSION_SUFFIX, META_PREFIX, SLIDE_INPUTS, SLIDE_OUTPUTS
from care_scale.exceptions import ExportError
from care_scale.inference.torch_backend import SlideEncoderGraph

DEFAULT_OPSET = 17
MIN_OPSET = 17
PATCH_INPUT = "tiles"
PATCH_OUTPUT = "features"


@dataclass
class OnnxExportInfo:
    """What :func:`export_patch_encoder_onnx` / ``export_slide_encoder_onnx`` wrote."""

    path: Path
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    metadata: dict[str, str] = field(default_factory=dict)


def _check_opset(opset: int) -> int:
    if int(opset) < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; care-scale exports opset >= {MIN_OPSET} "
                          "(LayerNormalization is a single op from 17 on)")
    return int(opset)


def resize_matrix(src: int, dst: int, *, resize_size: int | None = None,
                  mode: str = "bilinear") -> torch.Tensor:
    """``(dst, src)`` matrix ``A`` with ``A @ column`` == the encoder's resize of a column.

    The encoder's resize (:func:`care_scale.models.vit.resize_square`: bilinear or bicubic,
    antialiased as the torch encoder does it, then a centre crop when ``resize_size`` is set)
    is linear and separable, so applying that same function to the basis vectors gives the
    exact matrix; the graph then resizes with two MatMuls (``A @ X @ A.T``). That keeps
    parity with torch (ONNX Resize's antialias filter differs from torch's by several grey
    levels) and is plain MatMul for TensorRT.
    """
    from care_scale.models.vit import resize_square

    # Rows of the identity are basis images; resizing only the height gives A @ I = A.
    eye = torch.eye(src, dtype=torch.float64).view(1, 1, src, src)
    out = resize_square(eye, dst, resize_size=resize_size, mode=mode, rows_only=True)
    return out[0, 0].float().contiguous()  # (dst, src)


# The patch-encoder graph layout's revision (2: banded NHWC resize; 3: the entry's resize
# filter and centre crop) lives with the export cache's key, torch-free:
# care_scale.artifacts.PATCH_GRAPH_REVISION. Bump it there when this layout changes.


def banded_rows(matrix: torch.Tensor, rows_per_block: int = 8
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split ``matrix`` (dst, src) into blocks of ``rows_per_block`` output rows, each reading
    one window of ``width`` consecutive inputs: ``(blocks (nb, r, width), index (nb*width,))``
    with ``matrix @ x == (blocks @ x[index].view(nb, width, -1)).view(nb*r, -1)[:dst]``.

    A shrinking resize has a narrow band (about 2 x scale taps per output), so each block reads
    a few dozen inputs instead of all of them: 224 -> 64 px does ~6x fewer multiply-adds than
    the dense product. Exact: entries outside each window are zero. None when the windows
    would cover the input about as often as the dense product does.
    """
    dst, src = matrix.shape
    nb = -(-dst // rows_per_block)
    spans = []
    for b in range(nb):
        cols = torch.nonzero(matrix[b * rows_per_block : (b + 1) * rows_per_block].abs().sum(0))
        spans.append((int(cols.min()), int(cols.max())))
    width = max(hi - lo + 1 for lo, hi in spans)
    if nb * width * 2 > src * rows_per_block:  # saves less than half: keep the dense product
        return None
    starts = [min(lo, src - width) for lo, _ in spans]
    blocks = torch.zeros(nb, rows_per_block, width)
    for b, start in enumerate(starts):
        rows = matrix[b * rows_per_block : (b + 1) * rows_per_block]
        blocks[b, : len(rows)] = rows[:, start : start + width]
    index = torch.tensor([start + k for start in starts for k in range(width)])
    return blocks, index


class PatchEncoderGraph(nn.Module):
    """Export view of a patch encoder: uint8 NHWC tiles of one size -> features.

    Uses the encoder's ``forward_normalized`` (normalised NCHW -> features) and recreates its
    ``preprocess`` in export-friendly form: Cast first, then the fixed-size resize as matrix
    products in the NHWC layout (rows: a banded product over row windows; columns: one dense
    MatMul on the 3.5x smaller result), then NCHW. On the CPU this about halves the cost of a
    224 -> 64 px resize against ``A @ X @ A.T`` on NCHW (ONNX Runtime, one thread: 0.30-0.48
    instead of 0.54-0.72 ms per tile), and it is the same linear map as torch's
    ``interpolate`` (tests/test_export.py).
    """

    def __init__(self, encoder: nn.Module, tile_size: int):
        super().__init__()
        spec = getattr(encoder, "spec", None)
        if spec is None or not hasattr(encoder, "forward_normalized"):
            raise ExportError(f"{type(encoder).__name__}: not a care-scale patch encoder "
                              "(needs .spec and .forward_normalized)")
        self.encoder = encoder
        self.tile_size = int(tile_size)
        self.size = size = int(spec.input_size)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        plain = self.tile_size == size and spec.resize_size in (None, size)
        matrix = None if plain else resize_matrix(self.tile_size, size,
                                                  resize_size=spec.resize_size,
                                                  mode=spec.resize_interpolation)
        banded = banded_rows(matrix) if matrix is not None else None
        # Buffers (or None): the resize matrix, its transpose, and the banded row blocks.
        self.register_buffer("resize", matrix)
        self.register_buffer("resize_t", None if matrix is None else matrix.t().contiguous())
        self.register_buffer("row_blocks", None if banded is None else banded[0])
        self.register_buffer("row_index", None if banded is None else banded[1])

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.to(torch.float32)  # Cast straight off the uint8 input (TensorRT needs that)
        if self.resize is not None:
            b, t = x.shape[0], self.tile_size
            x = x.reshape(b, t, t * 3)  # rows of (column, channel) values
            if self.row_blocks is not None:
                nb, r, width = self.row_blocks.shape
                windows = torch.index_select(x, 1, self.row_index).reshape(b, nb, width, t * 3)
                x = torch.matmul(self.row_blocks, windows).reshape(b, nb * r, t * 3)
                x = x[:, : self.size]
            else:
                x = torch.matmul(self.resize, x)
            x = x.reshape(b, self.size, t, 3).permute(0, 3, 1, 2)  # NCHW, columns not resized
            x = torch.matmul(x, self.resize_t)
        else:
            x = x.permute(0, 3, 1, 2)
        x = (x - self.mean) / self.std
        return self.encoder.forward_normalized(x)


def patch_metadata(encoder: nn.Module, *, tile_size: int, model_version: str,
                   opset: int) -> dict[str, str]:
    """``metadata_props`` of an exported patch encoder."""
    import care_scale

    spec = encoder.spec
    return {
        "kind": "patch_encoder",
        "model": spec.name,
        "model_version": model_version,
        "embed_dim": str(spec.embed_dim),
        "input_size": str(spec.input_size),
        "tile_size": str(tile_size),
        "patch_size": str(tile_size),  # tile side in pixels at `mpp`, as the tiler cuts it
        "vit_patch_size": str(spec.patch_size),
        "mpp": repr(float(spec.mpp)),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "input_layout": "NHWC uint8 RGB",
        "trained": json.dumps(bool(getattr(encoder, "trained", False))),
        "opset": str(opset),
        "care_scale_version": getattr(care_scale, "__version__", "0.1.0"),
    }


def set_metadata(path: str | os.PathLike, metadata: dict[str, str], *, doc: str = "",
                 output_dims: dict[str, dict[int, int]] | None = None) -> None:
    """Write ``care_scale.*`` metadata_props into an ONNX file, then run the full checker.

    ``output_dims`` pins output axes the tracer left symbolic (e.g. the feature size) so that
    runtimes and readers see the real static size.
    """
    import onnx

    model = onnx.load(str(path))
    for out in model.graph.output:
        for axis, size in (output_dims or {}).get(out.name, {}).items():
            out.type.tensor_type.shape.dim[axis].dim_value = int(size)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        prop = model.metadata_props.add()
        prop.key = META_PREFIX + key
        prop.value = str(value)
    model.producer_name = "care-scale"
    model.doc_string = doc
    onnx.save(model, str(path))
    check_onnx(path)


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` with full shape inference; failures become :class:`ExportError`."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: onnx.checker rejected the exported graph: {exc}") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``care_scale.*`` metadata_props of an ONNX file (prefix stripped)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props
            if p.key.startswith(META_PREFIX)}


def io_signature(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Names, element types and (symbolic) shapes of the graph inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type),
                        "shape": dims})
        return out

    return describe(graph.input), describe(graph.output)


def _torch_export(module: nn.Module, args: tuple, path: Path, *, opset: int,
                  input_names: list[str], output_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream; see the module docstring for why we
        # use it. Tracer warnings about Python ints are expected for fixed model constants.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        # CARE's gathers never index with negative values (ids are clamped / built from
        # nonzero); the parity checks that follow every export would catch it if they did.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator",
                                category=UserWarning)
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ExportError(f"{type(module).__name__}: torch.onnx.export failed: {exc}") from exc


def export_patch_encoder_onnx(
    encoder: nn.Module,
    path: str | os.PathLike,
    *,
    model_version: str,
    tile_size: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxExportInfo:
    """Export ``encoder`` to ``path``: uint8 ``(batch, T, T, 3)`` -> float32 ``(batch, D)``."""
    opset = _check_opset(opset)
    spec = encoder.spec
    tile = int(tile_size or spec.input_size)
    graph = PatchEncoderGraph(encoder, tile).eval()
    example = torch.randint(0, 256, (2, tile, tile, 3), dtype=torch.uint8)
    path = Path(path)
    with torch.inference_mode(False), torch.no_grad():
        _torch_export(graph, (example,), path, opset=opset, input_names=[PATCH_INPUT],
                      output_names=[PATCH_OUTPUT],
                      dynamic_axes={PATCH_INPUT: {0: "batch"}, PATCH_OUTPUT: {0: "batch"}})
    metadata = patch_metadata(encoder, tile_size=tile, model_version=model_version, opset=opset)
    set_metadata(path, metadata, doc=f"care-scale patch encoder {spec.name} ({model_version}): "
                 f"uint8 (batch,{tile},{tile},3) RGB tiles -> float32 (batch,{spec.embed_dim})",
                 output_dims={PATCH_OUTPUT: {1: spec.embed_dim}})
    inputs, outputs = io_signature(path)
    return OnnxExportInfo(path, opset, inputs, outputs, metadata)


def slide_metadata(care: nn.Module, *, model_version: str, opset: int) -> dict[str, str]:
    """``metadata_props`` of an exported CARE: its config and the patch features it expects."""
    import dataclasses

    import care_scale
    from care_scale.models import get_patch_encoder_spec

    cfg = care.config
    meta = {
        "kind": "slide_encoder",
        "model": getattr(care, "name", "care"),
        "model_version": model_version,
        "in_dim": str(cfg.in_dim),
        "embed_dim": str(cfg.hidden_dim),
        "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        "trained": json.dumps(bool(getattr(care, "trained", False))),
        "opset": str(opset),
        "care_scale_version": getattr(care_scale, "__version__", "0.1.0"),
    }
    spec = getattr(care, "spec", None)
    if spec is not None:
        pe = get_patch_encoder_spec(spec.patch_encoder)
        meta.update({
            "patch_encoder": pe.name, "input_size": str(pe.input_size),
            "patch_size": str(pe.input_size), "mpp": repr(float(pe.mpp)),
            "mean": json.dumps(list(pe.mean)), "std": json.dumps(list(pe.std)),
        })
    return meta


def export_slide_encoder_onnx(
    care: nn.Module,
    path: str | os.PathLike,
    *,
    model_version: str,
    opset: int = DEFAULT_OPSET,
    example_patches: int = 300,
) -> OnnxExportInfo:
    """Export CARE to ``path`` with a dynamic number of patches (and of regions)."""
    opset = _check_opset(opset)
    cfg = care.config
    # A realistic example: a blob of patches larger than one sub-region window, so every
    # branch of the region logic (several windows, neighbours, ties) is exercised while tracing.
    gen = torch.Generator().manual_seed(0)
    side = int((example_patches * 1.5) ** 0.5) + 1
    cells = torch.randperm(side * side, generator=gen)[:example_patches]
    grid = torch.stack([cells % side, cells // side], 1).long()
    feats = torch.randn(example_patches, cfg.in_dim, generator=gen)
    path = Path(path)
    graph = SlideEncoderGraph(care).eval()
    with torch.inference_mode(False), torch.no_grad():
        _torch_export(graph, (feats, grid), path, opset=opset, input_names=list(SLIDE_INPUTS),
                      output_names=list(SLIDE_OUTPUTS),
                      dynamic_axes={"features": {0: "patches"}, "grid": {0: "patches"},
                                    **{k: v for k, v in SLIDE_OUTPUTS.items() if v}})
    metadata = slide_metadata(care, model_version=model_version, opset=opset)
    h = cfg.hidden_dim
    set_metadata(path, metadata,
                 doc=f"care-scale slide encoder {metadata['model']} ({model_version}): features "
                     f"float32 (patches,{cfg.in_dim}) + grid int64 (patches,2) -> CARE outputs",
                 output_dims={"slide_embedding": {0: h}, "region_embeddings": {1: h},
                              "roi_embedding": {0: h}})
    inputs, outputs = io_signature(path)
    return OnnxExportInfo(path, opset, inputs, outputs, metadata)


def quantize_patch_onnx(src: str | os.PathLike, dst: str | os.PathLike, *,
                        weight_bits: Literal[7, 8] = 7) -> OnnxExportInfo:
    """Int8 variant of an exported patch encoder: dynamic quantisation, per-channel int8
    MatMul weights (VNNI kernels on AVX-512 CPUs), activations quantised at run time.

    ``weight_bits``: 7 (``reduce_range``) runs correctly on any CPU: CPUs with AVX2 or
    AVX-512 but no VNNI run int8 MatMul as u8 x s8 with 16-bit intermediate sums, which
    saturate with full-range weights (ONNX Runtime's quantisation docs; measured on an
    AVX2-only machine, the micro ViT's error was 1.2e-1 with 8-bit weights and 2.3e-2 with 7).
    8 (full range) halves the rounding error where the CPU has VNNI / AMX-INT8 (32-bit sums):
    ViT-B's min cosine to fp32 0.9994 instead of 0.9984, inside ``precision: auto``'s bound
    of 0.999 where 7 bits are not; such a graph refuses to load on a CPU without them
    (``care_scale.inference.onnx_backend``). The two are different embeddings, so each has
    its own model version: ``+int8`` (7-bit) and ``+int8w8``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_bits not in (7, 8):
        raise ExportError(f"{src}: int8 weight_bits must be 7 or 8, got {weight_bits!r}")
    meta = read_metadata(src)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         reduce_range=weight_bits == 7)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"{src}: int8 quantisation failed: {exc}") from exc
    meta.update(model_version=meta["model_version"] + INT8_VERSION_SUFFIX[weight_bits],
                base_model_version=meta["model_version"],
                int8_weight_bits=str(weight_bits),
                quantization=f"int8 dynamic, per-channel {weight_bits}-bit weights (MatMul/Gemm)")
    set_metadata(dst, meta, doc=f"care-scale patch encoder {meta['model']} int8 variant")
    inputs, outputs = io_signature(dst)
    return OnnxExportInfo(Path(dst), int(meta["opset"]), inputs, outputs, meta)
