"""Make TRIDENT's own patch coordinates for two slides (reference fixtures).

``CMU-1-Small-Region.svs`` (one level, 20x) and ``synthetic_pyramid_20x.tif`` beside this
script (two levels, downsample 1 and 4, 0.5 um/px, written once by care-scale's
``write_synthetic_slide(path, width=2048, height=1536, mpp=0.5, seed=5, n_types=3,
jpeg_quality=70)`` and kept as a file so JPEG encoder versions cannot move its pixels).

Run once, in a separate virtual environment with what TRIDENT's patching needs (not
care-scale's environment)::

    python -m venv /work/tridentvenv
    /work/tridentvenv/bin/pip install torch==2.13.0 numpy opencv-python-headless shapely \
        geopandas openslide-python openslide-bin h5py pillow scikit-image pandas tqdm
    git clone https://github.com/mahmoodlab/TRIDENT /tmp/trident_src    # commit below
    /work/tridentvenv/bin/python tests/data/reference/make_trident_coords.py /tmp/trident_src

It runs TRIDENT's code unchanged, as ``run_batch_of_slides.py --task seg --segmenter otsu``
then ``--task coords`` do: ``OpenSlideWSI``, ``segment_tissue`` with the Otsu segmenter at its
own ``target_mag`` (1.25x) and ``holes_are_tissue=True`` (no ``--remove_holes``), the GeoJSON
written and read back, then ``extract_tissue_coords``. The only substitution: torchvision's
PyPI wheel needs CUDA torch, so ``torchvision.transforms`` is given here as the two names the
Otsu segmenter uses (``Compose``, ``ToTensor`` for numpy tiles, as torchvision defines them).
TRIDENT's package ``__init__`` (which imports every model family) is bypassed by importing its
modules from the source folder directly.

Writes, per slide, ``NAME.json`` (per case: TRIDENT's arguments, the coords and the coords
attributes it writes, and a digest of the pixels its feature extraction reads for each patch)
and ``NAME_masks.npz`` (its 1.25x tissue mask per MPP), NAME
``trident_cmu1_small`` and ``trident_synthetic_pyramid``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: (name, slide mpp passed to TRIDENT or None for the file's, target mag, patch size,
#:  overlap, min_tissue_proportion)
CMU_CASES = [
    ("care_20x_512", None, 20, 512, 0, 0.0),  # the CARE authors' --patch_size 512 --mag 20
    ("20x_256_min05", None, 20, 256, 0, 0.5),
    ("10x_256", None, 10, 256, 0, 0.0),
    ("20x_512_overlap128", None, 20, 512, 128, 0.0),
    ("mpp025_20x_512", 0.25, 20, 512, 0, 0.0),  # as if 40x: step 1024 level-0 px
]
PYRAMID_CASES = [
    ("20x_256", None, 20, 256, 0, 0.0),
    ("10x_256", None, 10, 256, 0, 0.0),  # downsample 2: read at level 0, 512 px
    ("5x_128", None, 5, 128, 0, 0.0),  # downsample 4: level 1 exactly, 128 px read
    ("20x_512_min025", None, 20, 512, 0, 0.25),
]
SLIDES = {
    "trident_cmu1_small": (HERE.parent / "CMU-1-Small-Region.svs", CMU_CASES),
    "trident_synthetic_pyramid": (HERE / "synthetic_pyramid_20x.tif", PYRAMID_CASES),
}


def _torchvision_transforms() -> None:
    import torch

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, img):
            for t in self.transforms:
                img = t(img)
            return img

    class ToTensor:  # torchvision.transforms.functional.to_tensor, numpy branch
        def __call__(self, pic):
            if pic.ndim == 2:
                pic = pic[:, :, None]
            img = torch.from_numpy(pic.transpose((2, 0, 1))).contiguous()
            if isinstance(img, torch.ByteTensor):
                return img.to(dtype=torch.get_default_dtype()).div(255)
            return img

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    tr.Compose, tr.ToTensor = Compose, ToTensor
    tv.transforms = tr
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr


def main(src: str) -> None:
    src_dir = Path(src).resolve()
    commit = subprocess.run(["git", "-C", str(src_dir), "rev-parse", "HEAD"],
                            check=True, capture_output=True, text=True).stdout.strip()
    _torchvision_transforms()
    pkg = types.ModuleType("trident")
    pkg.__path__ = [str(src_dir / "trident")]
    sys.modules["trident"] = pkg
    import geopandas
    import h5py
    import shapely
    import skimage
    import torch
    from trident.segmentation_models.load import segmentation_model_factory
    from trident.wsi_objects.OpenSlideWSI import OpenSlideWSI

    for name, (slide, cases) in SLIDES.items():
        run_slide(name, slide, cases, commit, segmentation_model_factory, OpenSlideWSI, h5py,
                  {"shapely": shapely.__version__,
                   "geos": ".".join(map(str, shapely.geos_version)),
                   "geopandas": geopandas.__version__, "scikit-image": skimage.__version__,
                   "torch": torch.__version__})


def run_slide(out_name, SLIDE, CASES, commit, segmentation_model_factory, OpenSlideWSI, h5py,
              versions) -> None:
    out: dict = {
        "slide": SLIDE.name,
        "trident_commit": commit,
        "versions": versions,
        "segmenter": "otsu", "holes_are_tissue": True,
        "cases": {},
    }
    masks = {}
    seg = segmentation_model_factory("otsu")
    with tempfile.TemporaryDirectory() as tmp:
        seg_dirs = {}
        for name, mpp, mag, patch, overlap, min_prop in CASES:
            key = "file" if mpp is None else f"mpp{mpp}"
            job = Path(tmp) / key
            if key not in seg_dirs:
                wsi = OpenSlideWSI(str(SLIDE), lazy_init=False, mpp=mpp)
                gj = wsi.segment_tissue(seg, target_mag=seg.target_mag, holes_are_tissue=True,
                                        job_dir=str(job), batch_size=16, device="cpu")
                seg_dirs[key] = gj
                wsi.release()
                # The mask segment_tissue made its polygons from (on a fresh WSI: one holding
                # contours would filter the segmentation tiles by them).
                wsi = OpenSlideWSI(str(SLIDE), lazy_init=False, mpp=mpp)
                pred, _ = wsi._segment_semantic(seg, seg.target_mag, False, "cpu", 16, None, 0,
                                                None)
                masks[f"mask_{key}"] = (pred > 0).astype(np.uint8)
                wsi.release()
            wsi = OpenSlideWSI(str(SLIDE), lazy_init=False, mpp=mpp,
                               tissue_seg_path=seg_dirs[key])
            h5 = wsi.extract_tissue_coords(target_mag=mag, patch_size=patch,
                                           save_coords=str(job / name), overlap=overlap,
                                           min_tissue_proportion=min_prop)
            with h5py.File(h5, "r") as f:
                coords = f["coords"][:]
                attrs = {k: (v.item() if hasattr(v, "item") else v)
                         for k, v in f["coords"].attrs.items()}
            attrs = {k: (str(v) if isinstance(v, bytes) else v) for k, v in attrs.items()
                     if k not in ("savetodir",)}
            # The pixels TRIDENT's feature extraction reads for each patch (extract_patch_features'
            # patcher, PIL tiles), as the first 16 hex digits of sha256 of the RGB array.
            patcher = wsi.create_patcher(patch_size=attrs["patch_size"],
                                         src_mag=attrs["level0_magnification"],
                                         dst_mag=attrs["target_magnification"],
                                         custom_coords=coords, coords_only=False, pil=True)
            digests = [hashlib.sha256(np.ascontiguousarray(np.asarray(tile)).tobytes())
                       .hexdigest()[:16] for tile, _, _ in patcher]
            out["cases"][name] = {
                "mpp": mpp, "target_mag": mag, "patch_size": patch, "overlap": overlap,
                "min_tissue_proportion": min_prop, "slide_mpp": wsi.mpp, "slide_mag": wsi.mag,
                "attrs": attrs, "coords": coords.astype(int).tolist(), "tile_sha256_16": digests,
            }
            print(name, len(coords), "patches; mag", wsi.mag, "mpp", wsi.mpp)
            wsi.release()
    (HERE / f"{out_name}.json").write_text(json.dumps(out, indent=1) + "\n")
    np.savez_compressed(HERE / f"{out_name}_masks.npz", **masks)


if __name__ == "__main__":
    main(sys.argv[1])
