"""Datasets of the experiments: shipped defaults (no network) and loaders for users' data.

Vision (images float32 in [0, 1], shape (N, H, W, C); labels int32):
  * ``digits``: scikit-learn's bundled 8x8 grayscale digits (1,797 images, 10 classes),
    split 80/20 with a fixed permutation.
  * ``cifar10``: the CIFAR-10 "python version" batches (``data_batch_1..5``,
    ``test_batch``: pickled dicts of ``b"data"`` (N, 3072) uint8 rows, R then G then B
    planes of 32x32, and ``b"labels"``) in ``data_dir``.
  * ``imagefolder``: ``data_dir/{train,test}/<class>/<image>`` (PNG/JPEG/BMP; classes
    sorted by name).
  Any of them resized to ``image_size`` x ``image_size`` if given (bilinear), so the
  digits also feed ViT-S/16 at 224x224.

Language (a uint8 byte stream, vocabulary 256):
  * ``stdlib``: the Python standard library's own ``.py`` sources (the running
    interpreter's), in sorted path order up to ``max_bytes``.
  * ``text``: any text files (a file, a directory searched for ``*.txt``/``*.md``/``*.py``,
    or a comma-separated list).
"""

from __future__ import annotations

import os
import pickle
import sysconfig
from typing import NamedTuple

import numpy as np

VISION_DATASETS = ("digits", "cifar10", "imagefolder")
TEXT_DATASETS = ("stdlib", "text")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class ImageData(NamedTuple):
  train_x: np.ndarray  # (N, H, W, C) float32 in [0, 1]
  train_y: np.ndarray  # (N,) int32
  test_x: np.ndarray
  test_y: np.ndarray
  classes: tuple[str, ...]


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> ImageData:
  """scikit-learn's digits as (N, 8, 8, 1) images in [0, 1] (pixel values 0..16 / 16)."""
  from sklearn.datasets import load_digits as sk_digits
  d = sk_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(len(y) * test_fraction))
  te, tr = perm[:n_test], perm[n_test:]
  return ImageData(x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10)))


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  data, labels = d[b"data"], d.get(b"labels", d.get(b"fine_labels"))
  if data is None or labels is None:
    raise ValueError(f"{path} is not a CIFAR-10 python batch (needs b'data' and b'labels')")
  x = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return x.astype(np.float32) / 255.0, np.asarray(labels, np.int32)


def load_cifar10(data_dir: str) -> ImageData:
  """CIFAR-10 python batches from ``data_dir`` (the ``cifar-10-batches-py`` folder)."""
  if not data_dir or not os.path.isdir(data_dir):
    raise ValueError(f"--data_dir={data_dir!r} is not a directory: point it at the "
                     "extracted cifar-10-batches-py folder (data_batch_1..5, test_batch)")
  train = sorted(f for f in os.listdir(data_dir) if f.startswith("data_batch_"))
  if not train or not os.path.exists(os.path.join(data_dir, "test_batch")):
    raise ValueError(f"--data_dir={data_dir!r} holds no data_batch_* and test_batch files "
                     "(the CIFAR-10 python version)")
  parts = [_cifar_batch(os.path.join(data_dir, f)) for f in train]
  tx, ty = _cifar_batch(os.path.join(data_dir, "test_batch"))
  classes = tuple(str(i) for i in range(10))
  meta = os.path.join(data_dir, "batches.meta")
  if os.path.exists(meta):
    with open(meta, "rb") as f:
      names = pickle.load(f, encoding="bytes").get(b"label_names")
    if names:
      classes = tuple(n.decode() for n in names)
  return ImageData(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   tx, ty, classes)


def _read_image(path: str, size: int | None) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as im:
    im = im.convert("RGB")
    if size is not None and im.size != (size, size):
      im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


def load_imagefolder(data_dir: str, image_size: int | None = None) -> ImageData:
  """``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` as RGB images."""
  if not data_dir or not os.path.isdir(data_dir):
    raise ValueError(f"--data_dir={data_dir!r} is not a directory: it must hold train/ and "
                     "test/, each with one sub-directory of images per class")
  split_dirs = [os.path.join(data_dir, s) for s in ("train", "test")]
  for d in split_dirs:
    if not os.path.isdir(d):
      raise ValueError(f"{d!r} is missing: an image folder needs train/<class>/ and "
                       "test/<class>/ sub-directories")
  classes = tuple(sorted(c for c in os.listdir(split_dirs[0])
                         if os.path.isdir(os.path.join(split_dirs[0], c))))
  if not classes:
    raise ValueError(f"{split_dirs[0]!r} has no class sub-directories")
  out = []
  for d in split_dirs:
    xs, ys = [], []
    for label, c in enumerate(classes):
      cdir = os.path.join(d, c)
      files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(_IMAGE_SUFFIXES)) \
          if os.path.isdir(cdir) else []
      xs += [_read_image(os.path.join(cdir, f), image_size) for f in files]
      ys += [label] * len(files)
    if not xs:
      raise ValueError(f"{d!r} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
      raise ValueError(f"images in {d!r} have different sizes {sorted(shapes)}: pass "
                       "--image_size to resize them")
    out += [np.stack(xs), np.asarray(ys, np.int32)]
  return ImageData(*out, classes)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W, C) float images in [0, 1] resized to (N, size, size, C), bilinear (PIL's,
  per channel, in float32), e.g. the 8x8 digits to 224x224 for ViT-S/16."""
  from PIL import Image
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"--image_size must be a positive integer, got {size!r}")
  if x.shape[1:3] == (size, size):
    return x
  out = np.empty((x.shape[0], size, size, x.shape[3]), np.float32)
  for i in range(x.shape[0]):
    for c in range(x.shape[3]):
      im = Image.fromarray(np.ascontiguousarray(x[i, :, :, c], np.float32), mode="F")
      out[i, :, :, c] = np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)
  return np.clip(out, 0.0, 1.0)


def load_images(dataset: str, data_dir: str | None = None, image_size: int | None = None,
                seed: int = 0) -> ImageData:
  """One of :data:`VISION_DATASETS`; ``image_size`` resizes any of them (square)."""
  if dataset == "imagefolder":
    return load_imagefolder(data_dir, image_size)
  if dataset == "digits":
    d = load_digits(seed)
  elif dataset == "cifar10":
    d = load_cifar10(data_dir)
  else:
    d = None
  if d is not None:
    if image_size is None:
      return d
    return d._replace(train_x=resize_images(d.train_x, image_size),
                      test_x=resize_images(d.test_x, image_size))
  raise ValueError(f"--dataset={dataset!r} is not a vision dataset; choose one of "
                   f"{', '.join(VISION_DATASETS)}")


def stdlib_sources() -> list[str]:
  """The standard library's ``.py`` files (sorted; site-packages and tests excluded)."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for d, subdirs, names in os.walk(root):
    subdirs[:] = sorted(s for s in subdirs if s not in ("site-packages", "test", "tests",
                                                         "idlelib", "__pycache__"))
    files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
  return files


def _text_files(source: str) -> list[str]:
  files = []
  for part in source.split(","):
    part = part.strip()
    if os.path.isdir(part):
      for d, subdirs, names in os.walk(part):
        subdirs.sort()
        files += [os.path.join(d, n) for n in sorted(names)
                  if n.endswith((".txt", ".md", ".py", ".rst"))]
    elif os.path.isfile(part):
      files.append(part)
    else:
      raise ValueError(f"--data_dir entry {part!r} is neither a file nor a directory")
  if not files:
    raise ValueError(f"--data_dir={source!r} holds no text files (*.txt, *.md, *.py, *.rst)")
  return files


def load_bytes(dataset: str, data_dir: str | None = None, max_bytes: int = 4_000_000) -> np.ndarray:
  """A uint8 byte stream (vocabulary 256) of one of :data:`TEXT_DATASETS`."""
  if dataset == "stdlib":
    files = stdlib_sources()
  elif dataset == "text":
    if not data_dir:
      raise ValueError("--dataset=text needs --data_dir (a file, a directory or a list)")
    files = _text_files(data_dir)
  else:
    raise ValueError(f"--dataset={dataset!r} is not a text dataset; choose one of "
                     f"{', '.join(TEXT_DATASETS)}")
  chunks, n = [], 0
  for f in files:
    with open(f, "rb") as fh:
      b = fh.read(max_bytes - n)
    chunks.append(b)
    n += len(b)
    if n >= max_bytes:
      break
  return np.frombuffer(b"".join(chunks), np.uint8).copy()


def batches(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The indices of batch ``step`` (epochs of fixed permutations from ``seed``): a pure
  function of its arguments, so a resumed run draws the same batches."""
  per_epoch = max(n // batch_size, 1)
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size:(i + 1) * batch_size] if batch_size <= n else \
      np.random.default_rng([seed, epoch]).integers(0, n, batch_size)
