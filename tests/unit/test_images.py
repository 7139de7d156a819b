"""Image data helpers: IDX parsing, frames, rotations, the file loader's image column."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.data import images as I
from fedbip_ray.data.datasets import load_dataset
from fedbip_ray.training.image import encode_frame


def _idx_bytes(arr: np.ndarray, code: int, be_dtype: str) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(be_dtype).tobytes()


def _write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def test_read_idx_gz_uint8_images_and_labels(tmp_path):
    imgs = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    _write_gz(tmp_path / "im.gz", _idx_bytes(imgs, 0x08, ">u1"))
    _write_gz(tmp_path / "lb.gz", _idx_bytes(labels, 0x08, ">u1"))
    got = I.read_idx(tmp_path / "im.gz")
    assert got.dtype == np.uint8 and got.shape == (3, 2, 4)
    assert np.array_equal(got, imgs)
    assert np.array_equal(I.read_idx(tmp_path / "lb.gz"), labels)


def test_parse_idx_big_endian_types_and_errors():
    vals = np.array([[1, -2], [300, -32000]], dtype=np.int16)
    got = I.parse_idx(_idx_bytes(vals, 0x0B, ">i2"))
    assert got.dtype == np.int16 and np.array_equal(got, vals)
    f = np.array([0.5, -1.25], dtype=np.float32)
    assert np.array_equal(I.parse_idx(_idx_bytes(f, 0x0D, ">f4")), f)
    good = _idx_bytes(np.zeros((2, 2), np.uint8), 0x08, ">u1")
    with pytest.raises(ValueError, match="magic"):
        I.parse_idx(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="data bytes"):
        I.parse_idx(good[:-1])
    with pytest.raises(ValueError, match="type byte"):
        I.parse_idx(bytes([0, 0, 0x07, 1, 0, 0, 0, 0]))


def test_fashion_mnist_loader_on_synthetic_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("t10k", 3)):
        imgs = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        _write_gz(tmp_path / f"{split}-images-idx3-ubyte.gz", _idx_bytes(imgs, 0x08, ">u1"))
        _write_gz(tmp_path / f"{split}-labels-idx1-ubyte.gz",
                  _idx_bytes(np.arange(n, dtype=np.uint8), 0x08, ">u1"))
    ds = I.load_fashion_mnist(None, 0, root=tmp_path)
    assert len(ds.frame) == 8 and ds.num_labels == 10
    assert ds.frame["label"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert set(ds.frame["text"]) == {""}
    assert (ds.frame["height"] == 28).all() and len(ds.frame["image"][0]) == 784
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        I.load_fashion_mnist(None, 0, root=tmp_path / "missing")


def test_digits_registry_loader():
    ds = load_dataset(config_from_dict({"model": {"name": "tiny-cnn",
                                                  "task": "image-classification"},
                                        "data": {"dataset": "digits"}}).data, 0)
    assert len(ds.frame) == 1797 and ds.label_names == tuple("0123456789")
    px = I.frame_pixels(ds.frame.iloc[:5], 8)
    assert px.shape == (5, 1, 8, 8) and float(px.max()) == 1.0 and float(px.min()) == 0.0


def test_frame_pixels_roundtrip_resize_and_mixed_channels():
    gray = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 10
    frame = I.images_to_frame(gray, np.array([1]))
    px = I.frame_pixels(frame, 4)
    assert px.shape == (1, 1, 4, 4)
    assert torch.allclose(px[0, 0], torch.from_numpy(gray[0] / 255.0).float())
    assert I.frame_pixels(frame, 8).shape == (1, 1, 8, 8)
    rgb = I.images_to_frame(np.full((1, 2, 2, 3), 255, np.uint8), np.array([0]))
    mixed = I.frame_pixels(pd.concat([frame, rgb], ignore_index=True), 6)
    assert mixed.shape == (2, 3, 6, 6)  # grayscale repeated to 3 channels
    assert torch.equal(mixed[0, 0], mixed[0, 2])
    with pytest.raises(ValueError, match="image/height/width"):
        I.frame_pixels(pd.DataFrame({"text": ["x"], "label": [0]}), 8)


def test_rotate_multiples_of_90_match_numpy():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert torch.equal(I.rotate(x, 90)[0, 0], torch.from_numpy(np.rot90(x[0, 0].numpy()).copy()))
    assert torch.equal(I.rotate(x, 180), torch.flip(x, dims=(-2, -1)))
    assert torch.equal(I.rotate(x, 360), x)
    # counter-clockwise: the top-right pixel (2) moves to the top-left
    assert I.rotate(x, 90)[0, 0, 0, 0] == 2.0


def test_rotate_sampled_agrees_with_rot90_and_turns_counter_clockwise():
    x = torch.rand(2, 3, 9, 9)
    assert torch.allclose(I.rotate_sampled(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(I.rotate_sampled(x, -90), torch.rot90(x, 3, dims=(-2, -1)), atol=1e-5)
    dot = torch.zeros(1, 1, 33, 33)
    dot[0, 0, 16, 26] = 1.0  # 10 px right of the centre
    out = I.rotate(dot, 45)[0, 0]
    r, c = divmod(int(out.argmax()), 33)
    # counter-clockwise by 45 degrees on screen: up (row - 7.07) and left (col - 2.93)
    assert (r, c) == (9, 23)
    assert torch.equal(I.rotate(dot, 90)[0, 0].nonzero()[0], torch.tensor([6, 16]))


def test_rotate_groups_and_encode_frame_rotate_by_group():
    assert [I.group_angle(g, 4) for g in range(4)] == [0.0, 90.0, 180.0, 270.0]
    assert I.group_angle(1, 3) == 120.0
    img = (np.arange(64, dtype=np.uint8).reshape(1, 8, 8) * 3)
    frame = pd.concat([I.images_to_frame(img, np.array([5]))] * 4, ignore_index=True)
    frame["group"] = [0, 1, 2, 3]
    data = encode_frame(frame, 8, num_rotation_groups=4)
    base = data.pixels[0:1]
    for g in range(1, 4):
        assert torch.equal(data.pixels[g : g + 1], torch.rot90(base, g, dims=(-2, -1)))
    assert data.labels.tolist() == [5, 5, 5, 5]
    plain = encode_frame(frame, 8, num_rotation_groups=None)
    assert all(torch.equal(plain.pixels[g], plain.pixels[0]) for g in range(4))
    # normalized to [-1, 1]
    assert float(plain.pixels.min()) == -1.0 and float(plain.pixels.max()) <= 1.0


def test_file_loader_decodes_png_image_column(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to decode PNG/JPEG columns")
    rows = []
    for i, mode in enumerate(["L", "RGB", "L"]):
        arr = np.full((5, 7) if mode == "L" else (5, 7, 3), 40 * (i + 1), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode=mode).save(buf, format="PNG")
        rows.append({"png": buf.getvalue(), "kind": ["cat", "dog", "cat"][i], "user": f"u{i}"})
    path = tmp_path / "imgs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    cfg = config_from_dict({"data": {"dataset": "file", "path": str(path), "text_column": "png",
                                     "label_column": "kind", "client_column": "user",
                                     "partition": {"kind": "column"}}})
    ds = load_dataset(cfg.data, 0)
    f = ds.frame
    assert ds.label_names == ("cat", "dog") and f["label"].tolist() == [0, 1, 0]
    assert f["client"].tolist() == ["u0", "u1", "u2"] and set(f["text"]) == {""}
    assert f["height"].tolist() == [5, 5, 5] and f["width"].tolist() == [7, 7, 7]
    assert [len(b) for b in f["image"]] == [35, 105, 35]
    px = I.frame_pixels(f, 4)
    assert px.shape == (3, 3, 4, 4)
    assert torch.allclose(px[1], torch.full((3, 4, 4), 80 / 255))
