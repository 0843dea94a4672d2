"""tf.data input pipelines: ImageNet (or any image TFDS dataset) and offline Fashion-MNIST, one augmentation path.

Sources differ only in how an example's pixels are read (JPEG bytes from TFDS, uint8 arrays from IDX files);
cropping windows, resizing, flipping, normalisation, sharding per host, shuffling and batching are shared.
Random ops are stateless and seeded per example, so a pipeline is deterministic for a seed.
"""

import concurrent.futures
import dataclasses
import gzip
import os
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from repvgg_jax import cli  # pylint: disable=g-import-not-at-top
from repvgg_jax.autoaugment import autoaugment, randaugment  # pylint: disable=g-import-not-at-top
from repvgg_jax.errors import DatasetError  # pylint: disable=g-import-not-at-top

# TensorFlow is only the input pipeline's engine: it must not grab an accelerator. Each op runs on one thread;
# the parallelism is across examples, in tf.data's pool (``input_threads``).
try:
  tf.config.set_visible_devices([], "GPU")
  tf.config.threading.set_intra_op_parallelism_threads(1)
except RuntimeError:  # TF was already initialised by the caller; its own settings stand.
  pass

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FOREVER = 2**62  # Stream positions and epochs are counted in int64.
_EPOCH_SEED_STRIDE = 1_000_003  # Epoch e of seed s shuffles with s * stride + e: distinct for any e < stride.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


@dataclasses.dataclass(frozen=True)
class Source:
  """Where examples come from.

  ``read(split, process_index, process_count)`` -> this process's shard of raw examples {"pixels", "label"};
  ``num_examples(split)`` counts the whole split from the local files; ``shape(pixels)`` -> (H, W, C);
  ``crop(pixels, window)`` -> the uint8 (h, w, C) image inside window (y, x, h, w).
  ``classes``: the label names where the source knows them. ``undecodable(split)``: the first file of the split
  that does not decode, where the source has files (asked only once decoding has failed).
  """

  num_classes: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_examples: Callable[[str], int]
  read: Callable[[str, int, int], tf.data.Dataset]
  shape: Callable[[tf.Tensor], tf.Tensor]
  crop: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
  classes: tuple[str, ...] = ()
  undecodable: Callable[[str], Optional[str]] = lambda split: None


# --------------------------------------------------------------------------- Host threads.

MIN_CPU_BACKEND_THREADS = 2


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def input_threads(cap: int = 0, backend: Optional[str] = None, cores: Optional[int] = None) -> int:
  """Threads that decode and augment: the size of tf.data's private pool and of TensorFlow's inter-op pool.

  The rule: where the model runs on an accelerator (``backend`` "gpu"/"tpu"; default ``jax.default_backend()``)
  decoding is the host's only work, so every usable core; where JAX itself computes on the CPU, half of them
  (at least MIN_CPU_BACKEND_THREADS), so XLA keeps its own threads and a 96-core CPU host still decodes on 48.
  ``cap`` > 0 (``config.input_threads``) is an upper bound.
  """
  cores = usable_cores() if cores is None else cores
  backend = jax.default_backend() if backend is None else backend
  threads = cores if backend != "cpu" else max(MIN_CPU_BACKEND_THREADS, cores // 2)
  return min(threads, cap) if cap > 0 else threads


def configure_host(cap: int = 0) -> int:
  """Sizes TensorFlow's inter-op pool by ``input_threads(cap)`` before TensorFlow starts (call it before any
  dataset is read); returns that count. Where TensorFlow already runs with another size, that size stands."""
  threads = input_threads(cap)
  try:
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  except RuntimeError:
    logging.info("TensorFlow already started with %d inter-op threads; tf.data's pools get %d.",
                 tf.config.threading.get_inter_op_parallelism_threads(), threads)
  return threads


def _with_threads(ds: tf.data.Dataset, cap: int) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = input_threads(cap)
  return ds.with_options(options)


# --------------------------------------------------------------------------- Fashion-MNIST from IDX files.

def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) IDX file of unsigned bytes, e.g. (N, 28, 28) images or (N,) labels."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DatasetError(f"{path} is not an IDX file of unsigned bytes.")
  ndim = data[3]
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise DatasetError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {body.size} bytes.")
  return body.reshape(dims)


def _fashion_mnist_paths(data_dir: str, split: str) -> tuple[str, str]:
  if split not in FASHION_MNIST_FILES:
    raise DatasetError(f"Fashion-MNIST has splits {list(FASHION_MNIST_FILES)}; got {split!r}.")
  paths = tuple(os.path.join(data_dir, name) for name in FASHION_MNIST_FILES[split])
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise DatasetError(f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
                       "`apt-get install dataset-fashion-mnist` (to /usr/share/datasets/fashion-mnist) or "
                       "set --config.data_dir to a folder holding the four *-ubyte.gz files.")
  return paths


def fashion_mnist_source(data_dir: str = "") -> Source:
  """Fashion-MNIST (28x28 grey, 10 classes) read offline from IDX files (Debian's dataset-fashion-mnist)."""
  data_dir = data_dir or FASHION_MNIST_DIR
  for split in FASHION_MNIST_FILES:
    _fashion_mnist_paths(data_dir, split)  # Fail before anything is built.

  def read(split, process_index, process_count):
    images_path, labels_path = _fashion_mnist_paths(data_dir, split)
    images, labels = read_idx(images_path)[..., None], read_idx(labels_path).astype(np.int32)
    if len(images) != len(labels):
      raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels.")
    images, labels = images[process_index::process_count], labels[process_index::process_count]
    return tf.data.Dataset.from_tensor_slices({"pixels": images, "label": labels})

  def num_examples(split):
    return len(read_idx(_fashion_mnist_paths(data_dir, split)[1]))

  return Source(num_classes=10, channels=1, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                num_examples=num_examples, read=read, shape=tf.shape,
                crop=lambda pixels, w: pixels[w[0]:w[0] + w[2], w[1]:w[1] + w[3]], classes=FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- TFDS (ImageNet and friends).

IMAGENET_PREPARATION = (
    "Prepare ImageNet once from the manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
    "<data_dir>/downloads/manual/ and run `tfds build imagenet2012 --data_dir=<data_dir>`.")


# The canonical sizes, so that nothing depends on the metadata a preparation wrote.
KNOWN_SPLIT_SIZES = {"imagenet2012": {"train": 1281167, "validation": 50000}}


def tfds_source(name: str, data_dir: str = "", splits=("train", "validation")) -> Source:
  """An image-classification TFDS dataset ({"image": JPEG-encoded, "label": int}) already prepared locally."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir or None)
  for split in splits:
    try:
      builder.as_dataset(split=split)
    except Exception as e:  # pylint: disable=broad-except
      hint = IMAGENET_PREPARATION if name.startswith("imagenet") else f"Run `tfds build {name}` first."
      raise DatasetError(f"TFDS dataset {name!r} split {split!r} is not readable in {builder.data_dir} "
                       f"({type(e).__name__}). {hint}") from e
  channels = builder.info.features["image"].shape[-1]
  mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)

  def num_examples(split):
    known = KNOWN_SPLIT_SIZES.get(name, {})
    return known[split] if split in known else builder.info.splits[split].num_examples

  def read(split, process_index, process_count):
    shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds = builder.as_dataset(split=shard, decoders={"image": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(shuffle_seed=0))
    return ds.map(lambda ex: {"pixels": ex["image"], "label": tf.cast(ex["label"], tf.int32)})

  def crop(jpeg, window):
    return tf.image.decode_and_crop_jpeg(jpeg, tf.stack(window), channels=channels)

  return Source(num_classes=builder.info.features["label"].num_classes, channels=channels, mean=mean, std=std,
                num_examples=num_examples, read=read, classes=tuple(builder.info.features["label"].names),
                shape=lambda jpeg: tf.image.extract_jpeg_shape(jpeg, output_type=tf.int32), crop=crop)


# --------------------------------------------------------------------------- Image folders.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG"  # How every JPEG and PNG file starts.


def starts_as_an_image(path: str) -> bool:
  """Whether the file's first bytes are a JPEG's or a PNG's (its extension aside)."""
  with open(path, "rb") as f:
    return f.read(4).startswith((JPEG_MAGIC, PNG_MAGIC))


def list_image_folder(data_dir: str, splits) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """``data_dir/<split>/<class>/<image>`` -> (class names, {split: [(path, label), ...]}), sorted.

  Classes are the sorted folder names of the first split (training); every file of a JPEG or PNG extension
  must start as a JPEG or PNG does (its first bytes are read, not the whole file). Raises DatasetError for a
  missing split, a split or class folder without images, an eval class the training split lacks, or a non-image
  file.
  """
  if not os.path.isdir(data_dir):
    raise DatasetError(f"data_dir {data_dir!r} is not a folder; the folder dataset reads "
                       "<data_dir>/<split>/<class>/<image>.")
  def class_folders(split):
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
      raise DatasetError(f"{root} is missing: the folder dataset reads <data_dir>/<split>/<class>/<image>; "
                         f"{data_dir} holds {sorted(os.listdir(data_dir))}.")
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))

  classes = class_folders(splits[0])
  if not classes:
    raise DatasetError(f"{os.path.join(data_dir, splits[0])} has no class folders (<class>/<image>).")
  files = {}
  for split in splits:
    extra = sorted(set(class_folders(split)) - set(classes))
    if extra:
      raise DatasetError(f"{os.path.join(data_dir, split)} has classes the training split "
                         f"{os.path.join(data_dir, splits[0])} lacks: {extra}.")
    files[split] = []
    for label, name in enumerate(classes):
      folder = os.path.join(data_dir, split, name)
      if not os.path.isdir(folder):
        continue
      images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      if not images:
        raise DatasetError(f"class folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
      files[split] += [(os.path.join(folder, f), label) for f in images]
    if not files[split]:
      raise DatasetError(f"{os.path.join(data_dir, split)} holds no images (<class>/<image>).")
  with concurrent.futures.ThreadPoolExecutor(32) as pool:  # Header reads wait on the disk, not the CPU.
    paths = [path for split in splits for path, _ in files[split]]
    for path, is_image in zip(paths, pool.map(starts_as_an_image, paths)):
      if not is_image:
        raise DatasetError(f"{path} is not a JPEG or PNG image (its first bytes say otherwise); remove or "
                           "replace it.")
  return classes, files


def _png_shape(data, channels: int):
  """(H, W, channels) from a PNG's IHDR chunk (big-endian width at bytes 16-19, height at 20-23)."""
  size = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int32)
  width, height = (size[0 + i] * 2**24 + size[1 + i] * 2**16 + size[2 + i] * 2**8 + size[3 + i] for i in (0, 4))
  return tf.stack([height, width, channels])


def _is_jpeg(data):
  return tf.equal(tf.strings.substr(data, 0, len(JPEG_MAGIC)), JPEG_MAGIC)


def image_file_decoding(channels: int):
  """(shape, crop) of a JPEG's or PNG's bytes, as ``Source`` has them, decoding to ``channels`` channels (grey
  and RGBA become RGB for 3). JPEGs take the fused decode-and-crop path."""

  def shape(data):
    return tf.cond(_is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data, output_type=tf.int32),
                   lambda: _png_shape(data, channels))

  def crop(data, window):
    return tf.cond(_is_jpeg(data), lambda: tf.image.decode_and_crop_jpeg(data, tf.stack(window), channels=channels),
                   lambda: tf.io.decode_png(data, channels=channels)[window[0]:window[0] + window[2],
                                                                     window[1]:window[1] + window[3]])

  return shape, crop


def folder_source(data_dir: str, splits=("train", "validation")) -> Source:
  """Images in ``data_dir/<split>/<class>/<image>`` (TFDS ImageFolder's layout), JPEG or PNG of any size; grey
  and RGBA become RGB. JPEGs take the fused decode-and-crop path, as ImageNet does. ``classes``: the names."""
  classes, files = list_image_folder(data_dir, splits)

  def read(split, process_index, process_count):
    paths, labels = zip(*files[split][process_index::process_count])
    ds = tf.data.Dataset.from_tensor_slices({"path": list(paths), "label": np.array(labels, np.int32)})
    return ds.map(lambda ex: {"pixels": tf.io.read_file(ex["path"]), "label": ex["label"]},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def undecodable(split):
    def fails(path):
      try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return False
      except tf.errors.OpError:
        return True

    with concurrent.futures.ThreadPoolExecutor(usable_cores()) as pool:
      paths = [path for path, _ in files[split]]
      return next((path for path, bad in zip(paths, pool.map(fails, paths)) if bad), None)

  shape, crop = image_file_decoding(3)
  return Source(num_classes=len(classes), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                num_examples=lambda split: len(files[split]), read=read, shape=shape, crop=crop,
                classes=tuple(classes), undecodable=undecodable)


def get_source(dataset: str, data_dir: str = "", splits=("train", "validation")) -> Source:
  """"fashion_mnist" reads the local IDX files; "folder" an image folder (``folder_source``); any other name is a
  locally prepared TFDS dataset whose ``splits`` must be readable."""
  if dataset == "fashion_mnist":
    return fashion_mnist_source(data_dir)
  if dataset == "folder":
    if not data_dir:
      raise DatasetError("the folder dataset needs --config.data_dir=<root> holding <split>/<class>/<image>.")
    return folder_source(data_dir, splits)
  return tfds_source(dataset, data_dir, splits)


# --------------------------------------------------------------------------- Shared preprocessing.

def random_resized_crop_window(shape, seed, area_min: float, aspect=(3 / 4, 4 / 3)):
  """Inception-style crop window (y, x, h, w) covering [area_min, 1] of the image with the given aspect range."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)), seed=seed,
      min_object_covered=area_min, aspect_ratio_range=aspect, area_range=(area_min, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(shape, ratio: float):
  """Centre square window (y, x, h, w) of ``ratio`` times the short side."""
  h, w = shape[0], shape[1]
  side = tf.cast(ratio * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def _resize(image, size: int):
  return tf.image.resize(image, (size, size), method="bilinear", antialias=False)


def _normalize(image, mean, std):
  return (tf.cast(image, tf.float32) / 255.0 - tf.constant(mean)) / tf.constant(std)


def eval_image_size(config) -> int:
  """The eval crop size: ``eval_image_size`` where set (e.g. RepVGGplus tests at 320 after training at 256)."""
  return config.eval_image_size or config.image_size


def preprocess_train(source: Source, example, seed, config):
  """Raw example -> {"image": (S, S, C) float32 normalised, "label"}: RandomResizedCrop, optional flip, and
  AutoAugment at ``config.autoaugment_strength`` (> 0) or RandAugment at ``config.randaugment_magnitude`` (> 0)
  on the resized uint8 crop."""
  crop_seed, flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  window = random_resized_crop_window(source.shape(example["pixels"]), crop_seed, config.crop_area_min)
  image = source.crop(example["pixels"], window)
  if config.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = _resize(image, config.image_size)
  if config.autoaugment_strength > 0:
    image = autoaugment(tf.saturate_cast(tf.round(image), tf.uint8), augment_seed, config.autoaugment_strength)
  elif config.randaugment_magnitude > 0:
    image = randaugment(tf.saturate_cast(tf.round(image), tf.uint8), augment_seed, config.randaugment_magnitude)
  return {"image": _normalize(image, source.mean, source.std), "label": example["label"]}


def eval_image(pixels, shape, crop, size: int, crop_ratio: float, mean, std):
  """Raw pixels -> (size, size, C) float32 normalised: the centre crop of ``crop_ratio`` of the short side,
  resized. ``shape`` and ``crop`` are a ``Source``'s."""
  window = center_crop_window(shape(pixels), crop_ratio)
  return _normalize(_resize(crop(pixels, window), size), mean, std)


def preprocess_eval(source: Source, example, config):
  """Raw example -> {"image", "label"}: ``eval_image`` at ``eval_image_size(config)``, ``eval_crop_ratio``."""
  return {"image": eval_image(example["pixels"], source.shape, source.crop, eval_image_size(config),
                              config.eval_crop_ratio, source.mean, source.std), "label": example["label"]}


def image_files(paths, channels: int, size: int, crop_ratio: float, mean, std) -> np.ndarray:
  """JPEG / PNG files -> (N, size, size, channels) float32, preprocessed as evaluation does (``eval_image``)."""
  shape, crop = image_file_decoding(channels)
  return np.stack([eval_image(tf.io.read_file(path), shape, crop, size, crop_ratio, mean, std).numpy()
                   for path in paths])


def train_dataset(source: Source, config, local_batch_size: int, seed: int, start_step: int = 0) -> tf.data.Dataset:
  """Infinite, shuffled, augmented batches of this process's shard of the training split, from ``start_step``.

  The stream is a pure function of (seed, position): epoch e is the shard shuffled with seed (seed, e), and
  the example at stream position p is augmented with the stateless seed (seed, p). Batch i holds positions
  [i * B, (i + 1) * B), so a run resumed at step N receives exactly the batches an uninterrupted run would.
  Resuming skips the raw records before position N * B of its epoch (read, never decoded nor augmented).
  """
  ds = source.read(config.train_split, jax.process_index(), jax.process_count())
  if config.cache:
    ds = ds.cache()
  epoch_size = int(ds.cardinality())
  if epoch_size <= 0:
    raise DatasetError(f"the {config.train_split!r} split of this process has {epoch_size} examples (or an unknown "
                       "count); exact resume needs its size.")
  start = start_step * local_batch_size
  first_epoch, offset = divmod(start, epoch_size)
  epochs = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(
      lambda epoch: ds.shuffle(config.shuffle_buffer, seed=seed * _EPOCH_SEED_STRIDE + epoch))
  positions = tf.data.Dataset.range(start, _FOREVER)
  ds = tf.data.Dataset.zip(epochs.skip(offset), positions)
  ds = ds.map(lambda ex, p: preprocess_train(source, ex, tf.stack([tf.constant(seed, tf.int64), p]), config),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return _with_threads(ds, config.input_threads).prefetch(2)


def numpy_batches(source: Source, split: str, dataset: tf.data.Dataset) -> Iterator[dict]:
  """``dataset``'s batches as numpy; an image that fails to decode (its header passed ``list_image_folder``'s
  check, its body did not) is a DatasetError naming the file where the source can find it."""
  try:
    yield from dataset.as_numpy_iterator()
  except tf.errors.InvalidArgumentError as e:
    bad = source.undecodable(split)
    raise DatasetError(f"{bad or f'an image of the {split!r} split'} does not decode ({cli.one_line(e)[:200]}); replace or "
                       "remove it.") from e


def eval_batches(source: Source, config, local_batch_size: int) -> Iterator[dict]:
  """This process's shard of the eval split as numpy batches of exactly ``local_batch_size``.

  The last batches are padded and carry ``mask`` 0 on padding. Every process yields the same number of
  batches (that of the largest shard), so collective ops in the eval step never wait on a finished host.
  """
  ds = source.read(config.eval_split, jax.process_index(), jax.process_count())
  largest_shard = -(-source.num_examples(config.eval_split) // jax.process_count())
  num_batches = -(-largest_shard // local_batch_size)
  if config.steps_per_eval > 0:
    num_batches = min(num_batches, config.steps_per_eval)
  ds = ds.map(lambda ex: preprocess_eval(source, ex, config), num_parallel_calls=tf.data.AUTOTUNE)
  it = numpy_batches(source, config.eval_split,
                     _with_threads(ds.batch(local_batch_size), config.input_threads).prefetch(2))
  for _ in range(num_batches):
    batch = next(it, None)
    size = eval_image_size(config)
    yield pad_batch(batch, local_batch_size, (size, size, source.channels))


def pad_batch(batch: Optional[dict], batch_size: int, image_shape) -> dict:
  """Pads a (possibly missing or short) batch to ``batch_size`` examples; ``mask`` marks the real ones."""
  if batch is None:
    batch = {"image": np.zeros((0,) + tuple(image_shape), np.float32), "label": np.zeros((0,), np.int32)}
  n = len(batch["label"])
  pad = batch_size - n
  return {"image": np.concatenate([batch["image"], np.zeros((pad,) + batch["image"].shape[1:], np.float32)]),
          "label": np.concatenate([batch["label"], np.zeros((pad,), np.int32)]),
          "mask": np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])}
