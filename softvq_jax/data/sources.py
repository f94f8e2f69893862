"""Random-access image sources for Grain.

Every source has ``__len__`` and ``__getitem__(i) -> {"image", "label", "name"}``
where ``image`` is encoded bytes, a file path or a uint8/uint16 array (decoded
later, in the pipeline's workers, by ``decode.to_pil_rgb``), ``label`` an int
and ``name`` something a person can find the example by. ``name`` (the
attribute) describes the whole source for error messages.

TensorFlow is never imported here: TFDS is imported lazily inside ``TfdsSource``
and reads prepared ArrayRecord datasets with NumPy decoding only.
"""

from __future__ import annotations

import gzip
import inspect
import os
from collections.abc import Sequence
from typing import Any, Mapping

import numpy as np
from absl import logging

from softvq_jax.data import records
from softvq_jax.utils.errors import JobError, first_line

# torchvision's ImageFolder extensions (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


class ImageFolderSource:
  """``root/<class>/**/<image>``; labels from the sorted class folder names (torchvision order)."""

  def __init__(self, root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    root = os.fspath(root)
    self.name = f"image folder {root}"
    if not root:
      raise JobError("image folder: no root directory given")
    if not os.path.exists(root):
      raise FileNotFoundError(f"image folder {root} does not exist")
    if not os.path.isdir(root):
      raise NotADirectoryError(f"image folder {root} is not a directory")
    self.root = root
    exts = tuple(e.lower() for e in extensions)
    self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not self.classes:
      loose = [e.name for e in os.scandir(root) if e.name.lower().endswith(exts)]
      hint = (f" ({len(loose)} images lie directly in it; move them into class folders, e.g. "
              f"{root}/all/)") if loose else ""
      raise JobError(f"image folder {root} has no class sub-folders; expected "
                     f"{root}/<class>/<image>{hint}")
    self.class_to_index = {c: i for i, c in enumerate(self.classes)}
    paths, labels, empty = [], [], []
    for c in self.classes:
      found = []
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
        dirnames.sort()  # walk order must not depend on the file system
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(exts))
      if not found:
        empty.append(c)
      paths.extend(found)
      labels.extend([self.class_to_index[c]] * len(found))
    if not paths:
      raise JobError(f"image folder {root} has {len(self.classes)} class folders but no images "
                     f"with extensions {', '.join(exts)}")
    if empty:
      logging.warning("image folder %s: %d class folders hold no images (labels kept): %s",
                      root, len(empty), ", ".join(empty[:10]))
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    logging.info("image folder %s: %d images in %d classes", root, len(paths), len(self.classes))

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    return {"image": path, "label": int(self.labels[index]),
            "name": os.path.relpath(path, self.root)}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


class ArrayRecordSource:
  """ArrayRecord files of msgpack dicts (``records.write_records``) with an image and a label.

  ``image`` may be encoded bytes (JPEG/PNG/...) or a uint8 array.
  """

  def __init__(self, paths: str | Sequence[str], image_key: str = "image",
               label_key: str = "label"):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = records.expand_paths(paths)
    self.name = f"ArrayRecord files {self.paths[0]}" + (
        f" (+{len(self.paths) - 1} more)" if len(self.paths) > 1 else "")
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except RuntimeError as e:
      raise JobError(f"{self._unreadable(grain)} cannot be read as ArrayRecord "
                     f"({first_line(e)})") from e
    self.image_key, self.label_key = image_key, label_key

  def _unreadable(self, grain) -> str:
    """The first file that fails to open alone (all of them, if each opens alone)."""
    for path in self.paths:
      try:
        grain.sources.ArrayRecordDataSource([path])
      except RuntimeError:
        return f"ArrayRecord file {path}"
    return self.name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      raw = self._source[index]
    except RuntimeError as e:
      raise JobError(f"record {index} of {self.name} cannot be read, the file is damaged "
                     f"({first_line(e)})") from e
    record = records.decode_record(raw)
    if self.image_key not in record:
      raise JobError(f"record {index} of {self.name} has no {self.image_key!r} field "
                     f"(fields: {sorted(record)})")
    return {"image": record[self.image_key], "label": _label(self, record),
            "name": str(record.get("name", f"record {index}"))}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


def write_image_records(path: str, source: Any, *, encode_arrays_as: str = "PNG") -> int:
  """Packs any source into one ArrayRecord file readable by ``ArrayRecordSource``.

  Paths are stored as the file's bytes (no re-encoding); arrays are encoded
  losslessly as ``encode_arrays_as``.
  """
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def gen():
    for i in range(len(source)):
      ex = source[i]
      image = ex["image"]
      if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
          image = f.read()
      elif isinstance(image, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=encode_arrays_as)
        image = buf.getvalue()
      yield {"image": bytes(image), "label": int(ex["label"]), "name": str(ex["name"])}

  return records.write_records(path, gen())


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord (``tfds.data_source``), e.g. ``imagenet2012``.

  Images are read undecoded (``SkipDecoding``) and decoded by our robust PIL
  decoder, like every other source; TFDS itself needs no TensorFlow for this.
  Prepare once with ``tfds build imagenet2012 --file_format=array_record``.
  """

  def __init__(self, dataset: str = "imagenet2012", split: str = "train",
               data_dir: str | None = None, image_key: str = "image", label_key: str = "label",
               name_key: str | None = "file_name"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = f"TFDS {dataset}/{split}" + (f" in {data_dir}" if data_dir else "")
    try:
      self._source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False,
                                      decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises several types; all mean "not there / not usable"
      raise FileNotFoundError(
          f"cannot open {self.name} for random access; prepare it as ArrayRecord with "
          f"`tfds build {dataset} --file_format=array_record"
          + (f" --data_dir={data_dir}" if data_dir else "") + f"` (TFDS said: {type(e).__name__}: "
          f"{e})") from e
    self.dataset, self.split = dataset, split
    self.image_key, self.label_key, self.name_key = image_key, label_key, name_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[index]
    name = ex.get(self.name_key) if self.name_key else None
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    return {"image": ex[self.image_key], "label": _label(self, ex),
            "name": str(name) if name is not None else f"{self.dataset}/{self.split}[{index}]"}

  def __repr__(self) -> str:
    return f"TfdsSource({self.dataset!r}, {self.split!r}, {len(self)} examples)"


def _read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST format), gzipped or not."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise JobError(f"{path} is not an unsigned-byte IDX file")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise JobError(f"{path} holds {array.size} bytes, its header says {shape}")
  return array.reshape(shape)


class FashionMnistSource:
  """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (28x28 grayscale, 10 classes).

  The pipeline turns the grayscale images into RGB and resizes them.
  """

  def __init__(self, split: str = "train", root: str = FASHION_MNIST_DIR):
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
      raise JobError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    self.name = f"Fashion-MNIST {split} in {root}"
    files = [os.path.join(root, f"{prefix}-{kind}-idx{n}-ubyte.gz")
             for kind, n in (("images", 3), ("labels", 1))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}; install them "
                              "with `apt-get install -y dataset-fashion-mnist`")
    self.images = _read_idx(files[0])
    self.labels = _read_idx(files[1]).astype(np.int32)
    if len(self.images) != len(self.labels):
      raise JobError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
    self.split = split
    self.classes = FASHION_MNIST_CLASSES

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index]),
            "name": f"fashion_mnist/{self.split}[{index}]"}


class SkimagePhotosSource:
  """Random square crops of scikit-image's bundled colour photos; label = which photo.

  Example ``i`` is a crop of photo ``i % 8`` whose side (a fraction in
  ``crop_fraction`` of the photo's short side) and corner are drawn from
  ``(seed, i)``: deterministic, real-image statistics, no download.
  """

  def __init__(self, num_examples: int = 256, crop_fraction: tuple[float, float] = (0.4, 1.0),
               seed: int = 0):
    from softvq_jax.data.photos import SKIMAGE_PHOTOS, load_photo  # pylint: disable=g-import-not-at-top
    photos, names = [], []
    for name in SKIMAGE_PHOTOS:
      image = load_photo(name)
      if image is not None:
        photos.append(image)
        names.append(name)
    if not photos:
      raise RuntimeError("scikit-image ships none of the expected photos")
    if num_examples < 1:
      raise JobError(f"num_examples must be >= 1, got {num_examples}")
    self.photos, self.classes = photos, tuple(names)
    self.num_examples, self.crop_fraction, self.seed = num_examples, crop_fraction, seed
    self.name = f"scikit-image photos ({num_examples} crops, seed {seed})"

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.name}")
    label = index % len(self.photos)
    photo = self.photos[label]
    rng = np.random.default_rng([self.seed, index])
    h, w = photo.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(*self.crop_fraction))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return {"image": photo[top:top + side, left:left + side], "label": label,
            "name": f"{self.classes[label]}[{index}]"}


class SyntheticSource:
  """Deterministic fake images for tests and smoke runs.

  Example ``i`` is a smooth random colour field (a coarse grid upsampled) of
  size ``image_shape`` (or a random size in ``[min_side, max_side]`` when
  ``image_shape`` is None) with label ``i % num_classes``; all drawn from
  ``(seed, i)``, so any process rebuilds the same data.
  """

  def __init__(self, num_examples: int = 64, image_shape: tuple[int, int] | None = (32, 32),
               num_classes: int = 10, seed: int = 0, min_side: int = 24, max_side: int = 48):
    if num_examples < 1:
      raise JobError(f"num_examples must be >= 1, got {num_examples}")
    self.num_examples, self.image_shape, self.num_classes, self.seed = (
        num_examples, image_shape, num_classes, seed)
    self.min_side, self.max_side = min_side, max_side
    self.name = f"synthetic ({num_examples} images, seed {seed})"

  def __len__(self) -> int:
    return self.num_examples

  def image(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, index])
    if self.image_shape is None:
      h, w = (int(v) for v in rng.integers(self.min_side, self.max_side + 1, 2))
    else:
      h, w = self.image_shape
    coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    ys, xs = np.linspace(0, 3, h), np.linspace(0, 3, w)
    y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    field = ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1]
             + fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])
    noise = rng.normal(0, 8, (h, w, 3))
    return np.clip(field + noise, 0, 255).astype(np.uint8)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.name}")
    return {"image": self.image(index), "label": index % self.num_classes,
            "name": f"synthetic[{index}]"}


SOURCES = ("synthetic", "folder", "array_record", "tfds", "fashion_mnist", "skimage")


def _label(source: Any, record: Mapping[str, Any]) -> int:
  """The record's class label; 0 where it has none (tokenizers need no labels), said once."""
  if source.label_key in record:
    return int(record[source.label_key])
  if not getattr(source, "_said_unlabelled", False):
    source._said_unlabelled = True  # pylint: disable=protected-access
    logging.warning("%s: records have no %r field; their label is 0 (class-conditional "
                    "generators need labels: set label_key)", source.name, source.label_key)
  return 0


def _source_class(kind: str) -> type:
  classes = {"synthetic": SyntheticSource, "folder": ImageFolderSource,
             "array_record": ArrayRecordSource, "tfds": TfdsSource,
             "fashion_mnist": FashionMnistSource, "skimage": SkimagePhotosSource}
  if kind not in classes:
    raise JobError(f"unknown data source {kind!r}; choose one of {', '.join(SOURCES)}")
  return classes[kind]


def make_source(kind: str, **kwargs: Any) -> Any:
  """Builds a source by name: one of ``SOURCES``; ``kwargs`` go to its constructor.

  ``folder`` takes ``root``; ``array_record`` takes ``paths``; ``tfds`` takes
  ``dataset``, ``split``, ``data_dir``; ``fashion_mnist`` takes ``split``.
  """
  return _source_class(kind)(**kwargs)


def _parameters(kind: str) -> dict[str, inspect.Parameter]:
  return {name: p for name, p in inspect.signature(_source_class(kind).__init__).parameters.items()
          if name != "self"}


def required_arguments(kind: str) -> set[str]:
  """The constructor arguments of source ``kind`` that have no default."""
  return {name for name, p in _parameters(kind).items()
          if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def split_kwargs(kind: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(taken, ignored)``: the arguments source ``kind`` takes, and the others (configs declare
  every source's arguments, so that flags can set them, and only one source reads each)."""
  names = set(_parameters(kind))
  return ({k: v for k, v in kwargs.items() if k in names},
          {k: v for k, v in kwargs.items() if k not in names})
