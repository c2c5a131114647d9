"""TRIDENT's side of the peer benchmark; runs in TRIDENT's own venv (install.sh), not ours.

    $PEER_VENV/bin/python trident_side.py --slides DIR --job DIR --model NAME --weights FILE

What ``run_single_slide.py --segmenter otsu --mag 20 --patch_size 512`` does, slide after
slide in one process, with the patch encoder a random timm model given through TRIDENT's
custom-encoder path (``CustomInferenceEncoder``): ``timm.create_model(NAME, num_classes=0)``
with the weights in FILE (care-scale's seeded build of the same architecture, so both
pipelines run the same model), eval transforms Resize(input, bicubic) + ToTensor +
Normalize(mean, std), fp32. No visualisation step (it is not part of embedding). Prints
one JSON line: seconds (from the first slide opened to the last feature file written), tiles,
and each slide's coordinate file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def encoder(model: str, weights: str, input_size: int, mean: list[float], std: list[float],
            timm_kwargs: dict):
    import timm
    import torch
    from torchvision import transforms
    from trident.patch_encoder_models.load import CustomInferenceEncoder

    # timm's ViT with the sizes given (names timm lacks, e.g. vit_micro, build as its ViT-Ti
    # with our spec's sizes; for timm's own names the sizes are its defaults).
    base = model if model in timm.list_models() else "vit_tiny_patch16_224"
    net = timm.create_model(base, pretrained=False, num_classes=0, **timm_kwargs)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    tf = transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    enc = CustomInferenceEncoder(model, net, tf, torch.float32)
    return enc.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406])
    ap.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225])
    ap.add_argument("--mag", type=int, default=20)
    ap.add_argument("--patch-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timm-kwargs", default="{}", help="JSON: timm.create_model's sizes")
    args = ap.parse_args()

    import h5py
    import torch
    from trident import load_wsi
    from trident.segmentation_models import segmentation_model_factory

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.time()
    enc = encoder(args.model, args.weights, args.input_size, args.mean, args.std,
                  json.loads(args.timm_kwargs))
    seg = segmentation_model_factory(model_name="otsu")
    tiles, coords_files = 0, {}
    for path in sorted(Path(args.slides).glob("*.tif*")):
        with load_wsi(slide_path=str(path), lazy_init=False) as slide:
            slide.segment_tissue(segmentation_model=seg, target_mag=seg.target_mag,
                                 job_dir=args.job, device="cpu", holes_are_tissue=True)
            save = os.path.join(args.job, f"{args.mag}x_{args.patch_size}px_0px_overlap")
            coords = slide.extract_tissue_coords(target_mag=args.mag,
                                                 patch_size=args.patch_size, save_coords=save)
            slide.extract_patch_features(patch_encoder=enc, coords_path=coords,
                                         save_features=os.path.join(save, "features"),
                                         device="cpu", batch_limit=args.batch)
            with h5py.File(coords, "r") as fh:
                tiles += int(fh["coords"].shape[0])
            coords_files[path.stem] = coords
    print(json.dumps({"seconds": time.time() - t0, "tiles": tiles, "coords": coords_files,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
