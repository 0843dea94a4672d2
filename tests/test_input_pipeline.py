"""Spec of the input pipelines: IDX parsing, shared augmentation, determinism, per-host shards, full eval."""

import numpy as np
import pytest

from configs import quickstart
from repvgg_jax import input_pipeline as ip
from tests.helpers import write_idx, write_image_folder


def _config(data_dir, **overrides):
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.shuffle_buffer = 64
  config.update(overrides)
  return config


@pytest.mark.parametrize("backend, cores, cap, threads", [
    ("gpu", 96, 0, 96), ("tpu", 240, 0, 240),      # beside an accelerator: every usable core decodes
    ("cpu", 96, 0, 48), ("cpu", 2, 0, 2), ("cpu", 1, 0, 2),  # JAX on the CPU keeps half for XLA
    ("gpu", 96, 16, 16), ("cpu", 96, 64, 48),      # input_threads caps, never raises
])
def test_decoding_threads_follow_the_host(backend, cores, cap, threads):
  assert ip.input_threads(cap, backend=backend, cores=cores) == threads


def test_both_pipelines_run_on_the_hosts_share_of_threads(fmnist_dir):
  source, config = ip.get_source("fashion_mnist", fmnist_dir), _config(fmnist_dir, input_threads=3)
  options = ip.train_dataset(source, config, 8, seed=0).options()
  assert options.threading.private_threadpool_size == min(3, ip.input_threads())
  assert ip.usable_cores() >= 1


def test_read_idx_round_trips(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_idx(str(tmp_path / "a.gz"), array)
  np.testing.assert_array_equal(ip.read_idx(str(tmp_path / "a.gz")), array)


def test_read_idx_rejects_a_file_of_another_format(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x89PNG not an idx file")
  with pytest.raises(ip.DatasetError, match="not an IDX file"):
    ip.read_idx(str(tmp_path / "bad"))


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path):
  with pytest.raises(ip.DatasetError, match=f"{tmp_path}.*apt-get install dataset-fashion-mnist"):
    ip.get_source("fashion_mnist", str(tmp_path))


def test_unprepared_tfds_dataset_explains_the_manual_preparation(tmp_path):
  with pytest.raises(ip.DatasetError, match="imagenet2012.*manual"):
    ip.get_source("imagenet2012", str(tmp_path))


def test_split_sizes_come_from_the_local_files(fmnist_dir):
  source = ip.get_source("fashion_mnist", fmnist_dir)
  assert (source.num_examples("train"), source.num_examples("test")) == (256, 72)


def test_train_batches_are_normalised_augmented_and_deterministic_for_a_seed(fmnist_dir):
  source, config = ip.get_source("fashion_mnist", fmnist_dir), _config(fmnist_dir)
  first = [next(ip.train_dataset(source, config, 32, seed=s).as_numpy_iterator()) for s in (0, 0, 1)]
  assert first[0]["image"].shape == (32, 28, 28, 1) and first[0]["image"].dtype == np.float32
  assert first[0]["label"].dtype == np.int32
  np.testing.assert_array_equal(first[0]["image"], first[1]["image"])
  assert not np.array_equal(first[0]["image"], first[2]["image"])
  assert abs(float(first[0]["image"].mean())) < 1.5 and 0.3 < float(first[0]["image"].std()) < 3


def test_eval_batches_cover_every_example_once_with_a_mask(fmnist_dir):
  source, config = ip.get_source("fashion_mnist", fmnist_dir), _config(fmnist_dir, eval_crop_ratio=1.0)
  batches = list(ip.eval_batches(source, config, 32))
  assert len(batches) == 3 and all(b["image"].shape == (32, 28, 28, 1) for b in batches)
  assert sum(b["mask"].sum() for b in batches) == 72
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, ip.read_idx(f"{fmnist_dir}/t10k-labels-idx1-ubyte.gz"))
  # Eval is the whole image, unaugmented: the class row stays bright where the label puts it.
  rows = np.argmax(batches[0]["image"][..., 0].mean(axis=2), axis=1)
  np.testing.assert_array_equal(rows, 2 * batches[0]["label"] + 4)


def test_eval_image_size_sets_the_eval_crops_apart_from_the_training_ones(fmnist_dir):
  source = ip.get_source("fashion_mnist", fmnist_dir)
  config = _config(fmnist_dir, image_size=24, eval_image_size=32)
  assert next(ip.eval_batches(source, config, 8))["image"].shape == (8, 32, 32, 1)
  assert next(ip.train_dataset(source, config, 8, seed=0).as_numpy_iterator())["image"].shape == (8, 24, 24, 1)


def test_randaugment_changes_the_training_images_as_a_function_of_the_seed(fmnist_dir):
  source = ip.get_source("fashion_mnist", fmnist_dir)
  plain, augmented = (_config(fmnist_dir, crop_area_min=1.0, random_flip=False, randaugment_magnitude=m)
                      for m in (0, 15))
  batch = lambda config, seed: next(ip.train_dataset(source, config, 32, seed=seed).as_numpy_iterator())["image"]
  np.testing.assert_array_equal(batch(augmented, 0), batch(augmented, 0))
  changed = np.abs(batch(augmented, 0) - batch(plain, 0)).reshape(32, -1).max(axis=1) > 0
  assert changed.mean() > 0.5  # Two ops per image; only the few that leave it whole (level 0) do not show.


def test_process_shards_partition_the_split(fmnist_dir):
  source = ip.get_source("fashion_mnist", fmnist_dir)
  shards = [list(source.read("test", i, 3).as_numpy_iterator()) for i in range(3)]
  assert sorted(len(s) for s in shards) == [24, 24, 24]
  pixels = np.concatenate([[ex["pixels"] for ex in s] for s in shards])
  assert len({p.tobytes() for p in pixels}) == len(pixels) == 72


def test_imagenet_path_decodes_crops_and_resizes_tfds_jpegs():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _config("", dataset="imagenet2012", image_size=64, crop_area_min=0.08, eval_crop_ratio=0.875,
                   train_split="train", eval_split="validation", steps_per_eval=1)
  with tfds.testing.mock_data(num_examples=8):
    source = ip.get_source("imagenet2012")
    assert source.num_classes == 1000 and source.channels == 3
    batch = next(ip.train_dataset(source, config, 4, seed=0).as_numpy_iterator())
    assert batch["image"].shape == (4, 64, 64, 3)
    eval_batch = next(ip.eval_batches(source, config, 4))
    assert eval_batch["image"].shape == (4, 64, 64, 3) and eval_batch["mask"].sum() == 4


def test_pad_batch_pads_with_masked_zeros():
  batch = {"image": np.ones((3, 2, 2, 1), np.float32), "label": np.array([1, 2, 3], np.int32)}
  padded = ip.pad_batch(batch, 5, (2, 2, 1))
  np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0])
  assert padded["image"].shape == (5, 2, 2, 1) and padded["image"][3:].sum() == 0


def test_a_stream_started_at_step_n_is_the_rest_of_the_uninterrupted_stream(fmnist_dir):
  config, batch = _config(fmnist_dir), 32  # 256 examples: 8 batches an epoch, so step 13 is inside epoch 1.
  source = ip.get_source("fashion_mnist", fmnist_dir)
  whole = list(ip.train_dataset(source, config, batch, seed=0).take(20).as_numpy_iterator())
  resumed = list(ip.train_dataset(source, config, batch, seed=0, start_step=13).take(7).as_numpy_iterator())
  for expected, got in zip(whole[13:], resumed):
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
  epochs = [np.sort(np.concatenate([b["label"] for b in whole[8 * e:8 * e + 8]])) for e in range(2)]
  np.testing.assert_array_equal(epochs[0], epochs[1])  # Each epoch is the whole shard once.
  assert not np.array_equal(whole[0]["label"], whole[8]["label"])  # Reshuffled every epoch.


def test_resuming_deep_into_an_epoch_does_not_decode_the_examples_it_skips(fmnist_dir):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  crops = []
  source = ip.get_source("fashion_mnist", fmnist_dir)

  def counting_crop(pixels, window):
    tf.py_function(lambda: crops.append(1) or 0, [], tf.int32)
    return source.crop(pixels, window)

  counted = dataclasses.replace(source, crop=counting_crop)
  config = _config(fmnist_dir, cache=False)
  next(ip.train_dataset(counted, config, 8, seed=0, start_step=30).as_numpy_iterator())  # 240 examples in.
  assert 8 <= len(crops) < 100


# --------------------------------------------------------------------------- Image folders.

def _folder_config(root, **overrides):
  return _config(root, dataset="folder", train_split="train", eval_split="val", image_size=16, **overrides)


def test_an_image_folder_gives_sorted_classes_and_rgb_images_of_any_size_and_mode(tmp_path):
  root = write_image_folder(tmp_path, {"train": {"dog": ["RGB", "L"], "cat": ["RGBA", "P", "RGB"]},
                                       "val": {"cat": ["L"], "dog": ["RGBA"]}})
  source = ip.get_source("folder", root, ("train", "val"))
  assert source.classes == ("cat", "dog") and source.num_classes == 2 and source.channels == 3
  assert (source.num_examples("train"), source.num_examples("val")) == (5, 2)
  config = _folder_config(root)
  batch = next(ip.train_dataset(source, config, 5, seed=0).as_numpy_iterator())
  assert batch["image"].shape == (5, 16, 16, 3) and sorted(batch["label"]) == [0, 0, 0, 1, 1]
  evaluated = list(ip.eval_batches(source, config, 4))
  assert evaluated[0]["image"].shape == (4, 16, 16, 3) and list(evaluated[0]["label"][:2]) == [0, 1]
  assert evaluated[0]["mask"].tolist() == [1, 1, 0, 0]


def test_a_png_shape_is_read_from_its_header_as_decoding_gives_it(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = write_image_folder(tmp_path, {"train": {"a": ["RGBA", "P", "RGBA"]}}, size=(300, 17))
  for path, _ in ip.list_image_folder(root, ("train",))[1]["train"]:
    data = tf.io.read_file(path)
    assert ip._png_shape(data, 3).numpy().tolist() == list(tf.io.decode_png(data, channels=3).shape)  # pylint: disable=protected-access


@pytest.mark.parametrize("make, message", [
    (lambda r: write_image_folder(r, {"train": {"a": ["RGB"]}}), r"val is missing"),
    (lambda r: write_image_folder(r, {"train": {"a": ["RGB"]}, "val": {"a": ["RGB"], "b": ["RGB"]}}),
     r"classes the training split .* lacks: \['b'\]"),
    (lambda r: (write_image_folder(r, {"train": {"a": ["RGB"]}, "val": {"a": ["RGB"]}}),
                (r / "train" / "empty").mkdir()), r"train/empty holds no .jpg/.jpeg/.png images"),
    (lambda r: ((r / "train").mkdir(), (r / "val").mkdir()), r"train has no class folders"),
    (lambda r: (write_image_folder(r, {"train": {"a": ["RGB"]}}), (r / "val").mkdir()), r"val holds no images"),
    (lambda r: (write_image_folder(r, {"train": {"a": ["RGB"]}, "val": {"a": ["RGB"]}}),
                (r / "train" / "a" / "notes.jpg").write_text("not an image")), r"notes.jpg is not a JPEG or PNG"),
])
def test_a_bad_image_folder_is_one_clear_error(tmp_path, make, message):
  make(tmp_path)
  with pytest.raises(ip.DatasetError, match=message):
    ip.get_source("folder", str(tmp_path), ("train", "val"))


def test_the_folder_dataset_needs_a_data_dir():
  with pytest.raises(ip.DatasetError, match="needs --config.data_dir"):
    ip.get_source("folder", "", ("train", "val"))
