"""experiments.data: the shipped datasets and the loaders for users' data, on small files
written here in each format."""

import os
import pickle

import numpy as np
import pytest

from experiments import data


def test_digits_split_shapes_and_range():
  d = data.load_digits()
  assert d.train_x.shape[1:] == (8, 8, 1) and d.train_x.dtype == np.float32
  assert len(d.train_y) + len(d.test_y) == 1797 and len(d.test_y) == 359
  assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
  assert set(np.unique(d.train_y)) == set(range(10))
  # Disjoint split: no test image index is in the training set (same seed, same split).
  assert data.load_digits().test_y.tolist() == d.test_y.tolist()


def _write_cifar(folder, rng, n_per_batch=6, batches=2):
  os.makedirs(folder)
  want = []
  for i in range(batches + 1):
    x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, n_per_batch).tolist()
    name = f"data_batch_{i + 1}" if i < batches else "test_batch"
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump({b"data": x, b"labels": y}, f)
    want.append((x, y))
  with open(os.path.join(folder, "batches.meta"), "wb") as f:
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
  return want


def test_cifar10_python_batches(tmp_path, rng):
  folder = str(tmp_path / "cifar-10-batches-py")
  want = _write_cifar(folder, rng)
  d = data.load_cifar10(folder)
  assert d.train_x.shape == (12, 32, 32, 3) and d.test_x.shape == (6, 32, 32, 3)
  x0, y0 = want[0]
  # Row layout: 1024 red, then green, then blue values of a 32x32 image, row-major.
  np.testing.assert_array_equal(d.train_x[0, 1, 2], x0[0, [32 + 2, 1024 + 32 + 2,
                                                           2048 + 32 + 2]] / np.float32(255))
  assert d.train_y[:6].tolist() == y0 and d.test_y.tolist() == want[2][1]
  assert d.classes[3] == "c3"


def test_imagefolder(tmp_path, rng):
  from PIL import Image
  want = {}
  for split in ("train", "test"):
    for c in ("cat", "dog"):
      os.makedirs(tmp_path / split / c)
      for i in range(3):
        px = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(px).save(tmp_path / split / c / f"{i}.png")
        want[(split, c, i)] = px
  d = data.load_imagefolder(str(tmp_path))
  assert d.classes == ("cat", "dog") and d.train_x.shape == (6, 6, 6, 3)
  assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
  np.testing.assert_array_equal(d.test_x[4], want[("test", "dog", 1)] / np.float32(255))
  resized = data.load_imagefolder(str(tmp_path), image_size=4)
  assert resized.train_x.shape == (6, 4, 4, 3)


def test_stdlib_and_text_bytes(tmp_path):
  b = data.load_bytes("stdlib", max_bytes=200_000)
  assert b.dtype == np.uint8 and len(b) == 200_000
  assert b"import" in b.tobytes()
  (tmp_path / "a.txt").write_text("hello ")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("world")
  (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
  t = data.load_bytes("text", str(tmp_path))
  assert t.tobytes() == b"hello world"
  assert data.load_bytes("text", str(tmp_path / "a.txt")).tobytes() == b"hello "


def test_batches_are_a_pure_function_of_step():
  a = [data.batches(100, 32, 0, s) for s in range(7)]
  b = [data.batches(100, 32, 0, s) for s in range(7)]
  assert all((x == y).all() for x, y in zip(a, b))
  epoch0 = np.concatenate(a[:3])
  assert len(set(epoch0.tolist())) == 96, "one epoch draws without replacement"
  assert not (a[0] == a[3]).all(), "a new epoch reshuffles"


@pytest.mark.parametrize("call,match", [
    (lambda tmp: data.load_cifar10(str(tmp / "missing")), "is not a directory"),
    (lambda tmp: data.load_cifar10(str(tmp)), "no data_batch"),
    (lambda tmp: data.load_imagefolder(str(tmp)), "train/<class>"),
    (lambda tmp: data.load_images("mnist"), "not a vision dataset"),
    (lambda tmp: data.load_bytes("text", None), "needs --data_dir"),
    (lambda tmp: data.load_bytes("text", str(tmp / "nope.txt")), "neither a file"),
    (lambda tmp: data.load_bytes("wiki"), "not a text dataset"),
])
def test_bad_data_arguments_raise_clear_errors(tmp_path, call, match):
  with pytest.raises(ValueError, match=match):
    call(tmp_path)


def test_digits_resized_for_a_patch_16_vit():
  small = data.load_images("digits")
  big = data.load_images("digits", image_size=32)
  assert big.train_x.shape == (len(small.train_y), 32, 32, 1)
  assert big.train_x.dtype == np.float32 and 0.0 <= big.train_x.min() <= big.train_x.max() <= 1.0
  np.testing.assert_array_equal(big.train_y, small.train_y)
  # Bilinear upsampling keeps each image's mean brightness close to the original's.
  np.testing.assert_allclose(big.test_x.mean(axis=(1, 2, 3)), small.test_x.mean(axis=(1, 2, 3)),
                             atol=0.03)


@pytest.mark.parametrize("x,size", [
    (np.full((2, 5, 7, 3), 0.25, np.float32), 6),   # a constant image stays constant
    (np.full((1, 8, 8, 1), 1.0, np.float32), 224),
])
def test_resize_images_constant(x, size):
  y = data.resize_images(x, size)
  assert y.shape == (x.shape[0], size, size, x.shape[3])
  np.testing.assert_allclose(y, x.flat[0], atol=1e-6)


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_resize_images_rejects_bad_sizes(size):
  with pytest.raises(ValueError, match="--image_size must be a positive integer"):
    data.resize_images(np.zeros((1, 4, 4, 1), np.float32), size)
