"""Run transformers' own `Sam3ImageProcessor` without torchvision (tests/test_data.py).

The processor module imports torchvision, which is not in the `dev` extra (PyPI's torchvision wheels pull in
CUDA torch). Its preprocessing, though, needs only two torchvision tensor kernels, and for a uint8 CPU tensor
both are thin wrappers over torch:

    transforms.v2.functional.resize(img, size, BILINEAR, antialias=True)
        -> torch.nn.functional.interpolate(img, size, mode="bilinear", align_corners=False, antialias=True)
           (torch's native uint8 antialiased kernel); NEAREST_EXACT -> interpolate(mode="nearest-exact")
    transforms.v2.functional.normalize(img, mean, std) -> (img - mean) / std, mean/std as tensors of img's dtype

`write_shim(root)` writes a minimal `torchvision` package with exactly these (everything else raises), so the
processor's own code (its defaults, size handling, dtype conversions, the fused rescale+normalize, the
segmentation-map path) runs unchanged. Run as a script in a subprocess (so the shim never shadows anything in
the test process):

    python tests/torchvision_shim.py IN.npz OUT.npz [--shim DIR]

IN.npz holds image_<i> uint8[H, W, 3] and size_<i> (S,) per case, and optionally seg_image / seg_map / seg_size
/ seg_mask_size; OUT.npz gets pixel_values_<i> and labels, and "backend" ("torchvision" or "shim"). Exit code 3:
the real torchvision is missing or broken here (the caller then retries with --shim).
"""

from __future__ import annotations

import sys
from pathlib import Path

_FILES = {
    "torchvision/__init__.py": "__version__ = '0.0.0+jalias.shim'\nfrom . import io, ops, transforms\n",
    "torchvision/io.py": "",
    "torchvision/ops/__init__.py": "from . import boxes\n",
    "torchvision/ops/boxes.py": "def batched_nms(*a, **k):\n    raise NotImplementedError('shim: batched_nms')\n",
    "torchvision/transforms/__init__.py": "from .functional import InterpolationMode\nfrom . import v2\n",
    "torchvision/transforms/functional.py": '''
import enum

import numpy as np
import torch


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def pil_to_tensor(pic):
    return torch.from_numpy(np.array(pic)).permute(2, 0, 1).contiguous()
''',
    "torchvision/transforms/v2/__init__.py": "from . import functional\n",
    "torchvision/transforms/v2/functional.py": '''
import torch
import torch.nn.functional as F

from ..functional import InterpolationMode


def resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
    if image.ndim == 2:
        return resize(image[None], size, interpolation, antialias)[0]
    mode = interpolation.value
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:])
    if mode == "bilinear":
        out = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=antialias)
    elif mode == "nearest-exact":
        out = F.interpolate(x, size=list(size), mode="nearest-exact")
    else:
        raise NotImplementedError(f"shim: resize mode {mode}")
    return out.reshape(*lead, *out.shape[-3:])


def normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image if inplace else image.clone()).sub_(mean).div_(std)


def grayscale_to_rgb(image):
    return image if image.shape[-3] != 1 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])


def _unused(name):
    def f(*a, **k):
        raise NotImplementedError(f"shim: {name}")
    return f


to_dtype, pad, crop = _unused("to_dtype"), _unused("pad"), _unused("crop")
''',
    "torchvision-0.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.0.0\n",
}


def write_shim(root: str | Path) -> Path:
    root = Path(root)
    for name, text in _FILES.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def main(argv: list[str]) -> int:
    import numpy as np

    src, dst, *rest = argv
    backend = "torchvision"
    if rest[:1] == ["--shim"]:
        sys.path.insert(0, str(write_shim(rest[1])))
        backend = "shim"
    try:
        from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

        proc = Sam3ImageProcessor()
        proc(images=np.zeros((8, 8, 3), np.uint8), return_tensors="pt")
    except Exception as e:  # noqa: BLE001 - torchvision missing or half-working: the caller uses the shim
        if backend == "shim":
            raise
        print(f"torchvision unusable here: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    if backend == "shim":
        import torchvision

        assert torchvision.__version__.endswith("jalias.shim")  # not a real torchvision found first
    out = {"backend": np.asarray(backend)}
    with np.load(src) as z:
        i = 0
        while f"image_{i}" in z.files:
            s = int(z[f"size_{i}"][0])
            out[f"pixel_values_{i}"] = proc(images=z[f"image_{i}"], size={"height": s, "width": s},
                                            return_tensors="pt")["pixel_values"].numpy()
            i += 1
        if "seg_map" in z.files:
            (h, w), (mh, mw) = z["seg_size"], z["seg_mask_size"]
            res = proc(images=z["seg_image"], segmentation_maps=z["seg_map"], size={"height": int(h), "width": int(w)},
                       mask_size={"height": int(mh), "width": int(mw)}, return_tensors="pt")
            out["labels"] = res["labels"].numpy()
    np.savez(dst, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
