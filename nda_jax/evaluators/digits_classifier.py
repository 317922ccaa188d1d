"""A small CNN trained once on the embedded digits; its features define `fd_digits`.

Where no Inception weights exist (the demo, CI), the Fréchet distance is taken
in the features of this classifier instead: `fd_digits`. It is NOT an FID and
its values are not comparable with any published number, only between runs
(e.g. NDA vs baseline on the demo).

The network sees 16x16 images (the digits are 8x8 originally; inputs of other
sizes are bilinearly resized, antialiased when shrinking). Features are the
128-d penultimate layer, before its ReLU. Training (a few seconds on a CPU) is
deterministic per `TrainConfig`; the result is cached in a file named by a
hash of that config, under `$NDA_JAX_CACHE` or `~/.cache/nda_jax`.
"""
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

from absl import logging
import chex
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nda_jax.data import digits
from nda_jax.models.layers import Conv

INPUT_SIZE = 16
FEATURE_DIM = 128
_FORMAT_VERSION = 1


class DigitsCNN(nn.Module):
  """conv16-conv32/2-conv64/2-dense128-dense10 on [-1, 1] NHWC images of any size."""

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    chex.assert_rank(x, 4)
    x = x.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), "linear")
    for features, stride in ((16, 1), (32, 2), (64, 2)):
      x = nn.relu(Conv(features, (3, 3), strides=(stride, stride))(x))
    features = nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1))
    logits = nn.Dense(digits.NUM_CLASSES)(nn.relu(features))
    return {"features": features, "logits": logits}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that determines the trained weights (and so the cache file)."""
  steps: int = 600
  batch_size: int = 64
  learning_rate: float = 1e-3
  max_shift: int = 1          # random translation (px, at 16x16) against overfitting
  seed: int = 0

  def digest(self) -> str:
    blob = json.dumps({**dataclasses.asdict(self), "format": _FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _to_unit(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def _random_shift(rng: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
  """Per-sample translation by up to `max_shift` px, filled with background (-1)."""
  if not max_shift:
    return x
  b, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def accuracy(variables: Any, images: np.ndarray, labels: np.ndarray) -> float:
  logits = jax.jit(DigitsCNN().apply)(variables, _to_unit(images))["logits"]
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def train(config: TrainConfig = TrainConfig()) -> tuple[Any, float]:
  """Trains on the digits' 'train' split; returns (variables, 'test' split accuracy)."""
  images, labels = digits.load_digits("train", INPUT_SIZE)
  x_all, y_all = jnp.asarray(_to_unit(images)), jnp.asarray(labels)
  model = DigitsCNN()
  rng = jax.random.key(config.seed)
  variables = model.init(rng, x_all[:1])
  tx = optax.adam(config.learning_rate)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, key):
    idx_key, shift_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (config.batch_size,), 0, x_all.shape[0])
    x = _random_shift(shift_key, x_all[idx], config.max_shift)

    def loss_fn(v):
      logits = model.apply(v, x)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_all[idx]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  for i in range(config.steps):
    variables, opt_state, loss = step(variables, opt_state, jax.random.fold_in(rng, i))
    loss.block_until_ready()
  test_images, test_labels = digits.load_digits("test", INPUT_SIZE)
  return variables, accuracy(variables, test_images, test_labels)


def default_path(config: TrainConfig = TrainConfig()) -> str:
  cache = os.environ.get("NDA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "nda_jax")
  return os.path.join(cache, f"fd_digits_classifier_{config.digest()}.msgpack")


def load_or_train(config: TrainConfig = TrainConfig(), path: str | None = None) -> Any:
  """The classifier's variables: read from `path` (default: the cache), else trained and saved."""
  path = path or default_path(config)
  if os.path.exists(path):
    with open(path, "rb") as f:
      blob = serialization.msgpack_restore(f.read())
    if blob.get("digest") != config.digest():
      raise ValueError(f"{path!r} holds a digits classifier of another TrainConfig "
                       f"(digest {blob.get('digest')!r}, want {config.digest()!r}); delete it "
                       f"or pass another path.")
    return blob["variables"]
  variables, acc = train(config)
  logging.info("fd_digits classifier: test accuracy %.4f, cached at %s", acc, path)
  blob = {"variables": jax.device_get(variables), "digest": config.digest(),
          "test_accuracy": acc}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Atomic write: concurrent runs may train it at the same time.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)))
  with os.fdopen(fd, "wb") as f:
    f.write(serialization.msgpack_serialize(blob))
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)
  return blob["variables"]
