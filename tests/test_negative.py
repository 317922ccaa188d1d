"""Tests of the image NDAs against numpy references, closed forms and invariants."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nda_jax.augment import negative
from nda_jax.augment import numpy_ref

B, H, W, C = 8, 16, 16, 3
PARTNER_FREE = ("jigsaw", "cutout", "rotate", "shift")


def _images(b=B, h=H, w=W, c=C, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (b, h, w, c)).astype(np.float32)


def _patches(img, k):
  """[k*k, h/k, w/k, C] row-major patches of one image."""
  h, w = img.shape[:2]
  return img.reshape(k, h // k, k, w // k, -1).transpose(0, 2, 1, 3, 4).reshape(
      k * k, h // k, w // k, -1)


# ----------------------------------------------------------------------------
# Contract, for every NDA.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(negative.NDAS))
def test_contract_shape_dtype_jit_determinism(name):
  # One jit compile per NDA (mixup/cutmix compile jax.random.beta, ~3 s each);
  # the other checks run eagerly, where the compiled primitives are cached.
  fn = negative.NDAS[name]
  x = jnp.asarray(_images())
  key = jax.random.key(1)
  eager = np.asarray(fn(key, x))
  jitted = jax.jit(fn)(key, x)
  assert jitted.shape == x.shape and jitted.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-6)
  assert np.any(eager != np.asarray(x)), "the NDA changed nothing"
  np.testing.assert_array_equal(np.asarray(fn(key, x)), eager)
  if name != "rotate":  # rotate is deterministic, as in the official code
    assert not np.array_equal(np.asarray(fn(jax.random.key(2), x)), eager)
  # One key == the per-sample keys split from it.
  keys, _ = negative.split_rng(key, B)
  np.testing.assert_array_equal(np.asarray(fn(keys, x)), eager)
  # bfloat16 in, bfloat16 out: the float32 result up to bfloat16 rounding.
  half = fn(key, x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16 and half.shape == x.shape
  np.testing.assert_allclose(np.asarray(half, np.float32), eager, atol=3e-2)


@pytest.mark.parametrize("name", ("jigsaw", "cutmix", "rotate"))
def test_vmap_over_groups_equals_separate_calls(name):
  fn = negative.NDAS[name]
  x = jnp.asarray(_images(b=2 * B)).reshape(2, B, H, W, C)
  keys = jax.random.split(jax.random.key(0), 2)
  out = np.asarray(jax.jit(jax.vmap(fn))(keys, x))
  for g in range(2):
    np.testing.assert_allclose(out[g], np.asarray(fn(keys[g], x[g])), atol=1e-6)


def test_split_rng_conventions():
  typed, raw = jax.random.key(0), jax.random.PRNGKey(0)
  for rng in (typed, raw):
    keys, batch_key = negative.split_rng(rng, 5)
    assert keys.shape[0] == 5 and batch_key.shape == rng.shape
    again, _ = negative.split_rng(keys, 5)  # B keys are used as given
    np.testing.assert_array_equal(jax.random.key_data(again), jax.random.key_data(keys))
  x = jnp.asarray(_images(b=5))
  np.testing.assert_array_equal(negative.jigsaw(raw, x), negative.jigsaw(
      jax.random.wrap_key_data(raw), x))


@pytest.mark.parametrize("name", PARTNER_FREE)
def test_per_sample_key_result_does_not_depend_on_rest_of_batch(name):
  fn = negative.NDAS[name]
  x = jnp.asarray(_images())
  keys = jax.random.split(jax.random.key(5), B)
  full = np.asarray(fn(keys, x))
  part = np.asarray(fn(keys[2:5], x[2:5]))
  np.testing.assert_allclose(full[2:5], part, atol=1e-6, rtol=0)  # reductions may reassociate


@pytest.mark.parametrize("name", ("jigsaw", "cutout", "shift"))
def test_per_sample_randomness_differs_across_samples(name):
  x = jnp.asarray(np.repeat(_images(b=1), B, axis=0))
  out = np.asarray(negative.NDAS[name](jax.random.key(0), x))
  assert len({o.tobytes() for o in out}) > 1


def test_rng_of_wrong_size_is_rejected():
  with pytest.raises(ValueError, match="one per sample"):
    negative.jigsaw(jax.random.split(jax.random.key(0), 3), jnp.zeros((4, 4, 4, 1)))


def test_partner_indices_is_a_derangement():
  for b in (2, 3, 8, 33):
    for seed in range(5):
      p = np.asarray(negative.partner_indices(jax.random.key(seed), b))
      assert sorted(p) == list(range(b)) and np.all(p != np.arange(b))


# ----------------------------------------------------------------------------
# Jigsaw.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", (2, 4))
def test_jigsaw_official_matches_numpy_official_code(k):
  x = _images()
  key = jax.random.key(7)
  keys, _ = negative.split_rng(key, B)
  perms = np.asarray(negative.nonidentity_permutations(keys, k * k))
  assert np.all(np.sort(perms, axis=1) == np.arange(k * k))
  assert not np.any(np.all(perms == np.arange(k * k), axis=1))
  out = np.asarray(jax.jit(negative.jigsaw, static_argnames="k")(key, jnp.asarray(x), k=k))
  np.testing.assert_array_equal(out, numpy_ref.jigsaw_k(x, k, perms=perms))


@pytest.mark.parametrize("layout", negative.JIGSAW_LAYOUTS)
def test_jigsaw_output_is_a_permutation_of_input_patches(layout):
  x = _images()
  out = np.asarray(negative.jigsaw(jax.random.key(0), jnp.asarray(x), k=4, layout=layout))
  for xi, oi in zip(x, out):
    src, dst = _patches(xi, 4), _patches(oi, 4)
    assert sorted(p.tobytes() for p in src) == sorted(p.tobytes() for p in dst)


def test_jigsaw_layouts_and_identity_frequency():
  # 2x2 one-channel images: each patch is one pixel with a distinct value.
  n = 4600
  x = jnp.broadcast_to(jnp.arange(4.0).reshape(1, 2, 2, 1) / 4, (n, 2, 2, 1))
  key = jax.random.key(11)
  jig = jax.jit(negative.jigsaw, static_argnames="layout")
  keys, _ = negative.split_rng(key, n)
  perms = np.asarray(negative.nonidentity_permutations(keys, 4))
  # Uniform over the 23 non-identity permutations.
  counts = {p: 0 for p in itertools.permutations(range(4)) if p != (0, 1, 2, 3)}
  for p in map(tuple, perms):
    counts[p] += 1  # KeyError on the identity
  assert min(counts.values()) > 140 and max(counts.values()) < 265  # mean 200
  same = np.all(np.asarray(jig(key, x, layout="official")) == np.asarray(x), axis=(1, 2, 3))
  # Official quirk: only perm [0, 2, 1, 3] returns the input, ~1/23 of samples.
  assert abs(same.mean() - 1 / 23) < 0.015
  np.testing.assert_array_equal(same, np.all(perms == [0, 2, 1, 3], axis=1))
  clean = np.asarray(jig(key, x, layout="clean"))
  assert not np.any(np.all(clean == np.asarray(x), axis=(1, 2, 3)))


def test_nonidentity_permutation_covers_all_small_permutations():
  perms = np.asarray(negative.nonidentity_permutations(
      jax.random.split(jax.random.key(0), 300), 3))
  assert {tuple(p) for p in perms} == set(itertools.permutations(range(3))) - {(0, 1, 2)}
  with pytest.raises(ValueError, match="n >= 2"):
    negative.nonidentity_permutations(jax.random.split(jax.random.key(0), 2), 1)


def test_jigsaw_rejects_indivisible_sizes_and_bad_layout():
  with pytest.raises(ValueError, match="divisible"):
    negative.jigsaw(jax.random.key(0), jnp.zeros((2, 6, 6, 1)), k=4)
  with pytest.raises(ValueError, match="official"):
    negative.jigsaw(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), layout="transposed")


# ----------------------------------------------------------------------------
# NDAs with partners: recover the partner and the mixing from the output.
# ----------------------------------------------------------------------------
def _stitch_structure(x, out):
  """Per sample: (partner, orientation) such that out is a half/half stitch."""
  result = []
  h, w = x.shape[1:3]
  for i, o in enumerate(out):
    found = []
    for j in range(len(x)):
      if np.array_equal(o[:h // 2], x[i, :h // 2]) and np.array_equal(o[h // 2:], x[j, h // 2:]):
        found.append((j, "horizontal"))
      if np.array_equal(o[:, :w // 2], x[i, :, :w // 2]) and np.array_equal(o[:, w // 2:],
                                                                            x[j, :, w // 2:]):
        found.append((j, "vertical"))
    assert len(found) == 1, f"sample {i} is not a stitch of itself and one partner"
    result.append(found[0])
  return result


@pytest.mark.parametrize("per_sample", (True, False))
def test_stitch_is_half_image_half_partner(per_sample):
  x = _images(b=32)
  out = np.asarray(negative.stitch(jax.random.key(3), jnp.asarray(x), per_sample=per_sample))
  structure = _stitch_structure(x, out)
  partners = np.array([j for j, _ in structure])
  assert sorted(partners) == list(range(32)) and np.all(partners != np.arange(32))
  orientations = {o for _, o in structure}
  assert len(orientations) == (2 if per_sample else 1)


def _mixup_structure(x, out):
  """Per sample: (partner j, lam) minimising |out_i - lam x_i - (1-lam) x_j|."""
  result = []
  for i, o in enumerate(out):
    best = None
    for j in range(len(x)):
      if j == i:
        continue
      d = (x[i] - x[j]).ravel()
      lam = np.dot((o - x[j]).ravel(), d) / np.dot(d, d)
      err = np.abs(lam * x[i] + (1 - lam) * x[j] - o).max()
      if best is None or err < best[2]:
        best = (j, lam, err)
    assert best[2] < 1e-5, f"sample {i} is no convex mix of itself and another image"
    result.append(best[:2])
  return result


@pytest.mark.parametrize("per_sample", (True, False))
def test_mixup_is_convex_combination_with_beta_lambda(per_sample):
  x = _images(b=64)
  out = np.asarray(negative.mixup(jax.random.key(4), jnp.asarray(x), per_sample=per_sample))
  partners, lams = map(np.array, zip(*_mixup_structure(x, out)))
  assert sorted(partners) == list(range(64))
  assert np.all((lams > 0) & (lams < 1))
  if per_sample:  # Beta(25, 25): mean 0.5, std 0.07.
    assert abs(lams.mean() - 0.5) < 0.04 and 0.04 < lams.std() < 0.1
  else:
    np.testing.assert_allclose(lams, lams[0], atol=1e-5)


def _changed_box(a, b):
  """(top, bottom, left, right) of the pixels where a != b; asserts it is a full box."""
  changed = np.any(a != b, axis=-1)
  if not changed.any():
    return None
  rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
  box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
  assert changed[box[0]:box[1], box[2]:box[3]].all() and changed.sum() == (
      (box[1] - box[0]) * (box[3] - box[2])), "changed pixels do not form a box"
  return box


@pytest.mark.parametrize("per_sample", (True, False))
def test_cutmix_pastes_one_partner_box(per_sample):
  x = _images(b=32, h=32, w=32)
  out = np.asarray(negative.cutmix(jax.random.key(8), jnp.asarray(x), per_sample=per_sample))
  boxes = []
  for i, o in enumerate(out):
    box = _changed_box(o, x[i])
    if box is None:
      continue
    t, b_, l, r = box
    sources = [j for j in range(len(x)) if np.array_equal(o[t:b_, l:r], x[j, t:b_, l:r])]
    assert len(sources) == 1 and sources[0] != i
    # rand_bbox: the sides are 2 * (cut // 2) unless clipped at the border.
    assert (b_ - t) % 2 == 0 or t == 0 or b_ == 32
    assert (r - l) % 2 == 0 or l == 0 or r == 32
    boxes.append(box)
  assert boxes
  assert len(set(boxes)) == 1 if not per_sample else len(set(boxes)) > 5


def test_mosaic_cells_come_from_distinct_images():
  k = 2
  x = _images(b=8)
  out = np.asarray(negative.mosaic(jax.random.key(9), jnp.asarray(x), k=k))
  layouts = set()
  for i, o in enumerate(out):
    src = []
    for r, c in itertools.product(range(k), range(k)):
      cell = np.s_[r * H // k:(r + 1) * H // k, c * W // k:(c + 1) * W // k]
      matches = [j for j in range(len(x)) if np.array_equal(o[cell], x[j][cell])]
      assert len(matches) == 1
      src.append(matches[0])
    assert src.count(i) == 1 and len(set(src)) == k * k
    layouts.add(src.index(i))
  assert len(layouts) > 1  # where the own cell sits is drawn per sample


# ----------------------------------------------------------------------------
# NDAs on one image.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ("jax", "numpy_official"))
def test_cutout_replaces_one_square_by_its_mean(impl):
  x = _images(b=64, h=32, w=32)
  if impl == "jax":
    out = np.asarray(negative.cutout(jax.random.key(6), jnp.asarray(x)))
  else:  # the same property holds for the reference used by the benchmark
    out = numpy_ref.cutout(x, np.random.default_rng(0))
  sides = set()
  for xi, oi in zip(x, out):
    t, b_, l, r = _changed_box(oi, xi)
    assert b_ - t == r - l and 10 <= b_ - t < 20
    sides.add(b_ - t)
    np.testing.assert_allclose(oi[t:b_, l:r], np.broadcast_to(
        xi[t:b_, l:r].mean(axis=(0, 1)), (b_ - t, r - l, C)), atol=1e-5)
  assert len(sides) > 5


def test_cutout_clips_square_to_small_images():
  x = _images(b=4, h=8, w=8)
  out = np.asarray(negative.cutout(jax.random.key(0), jnp.asarray(x)))
  np.testing.assert_allclose(out, np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape),
                             atol=1e-5)


@pytest.mark.parametrize("angle", (90, 180, 270, -90, 450))
def test_rotate_multiples_of_90_are_pil_direction_rot90(angle):
  x = _images(b=2)
  out = np.asarray(negative.rotate(None, jnp.asarray(x), angle=angle))
  np.testing.assert_array_equal(out, np.rot90(x, angle // 90, axes=(1, 2)))
  np.testing.assert_array_equal(out, numpy_ref.rotate(x, angle))


@pytest.mark.parametrize("angle,shape,interpolation", [
    (60.0, (16, 16), "bilinear"), (33.0, (16, 16), "bilinear"),
    (60.0, (12, 20), "bilinear"), (90.0, (12, 20), "bilinear"),
    (60.0, (16, 16), "nearest")])
def test_rotate_matches_pil_on_float_images(angle, shape, interpolation):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  x = _images(b=2, h=shape[0], w=shape[1])
  out = np.asarray(negative.rotate(None, jnp.asarray(x), angle=angle,
                                   interpolation=interpolation))
  resample = Image.BILINEAR if interpolation == "bilinear" else Image.NEAREST
  ref = numpy_ref.rotate(x, angle, resample=resample)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert np.sum(out == -1.0) > 10  # corners are filled black


def _recover_shift(xi, oi, lo, hi):
  found = [s for s in range(lo, hi) if np.array_equal(oi, np.roll(xi, (s, s), axis=(0, 1)))]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("per_sample", (True, False))
def test_shift_is_a_cyclic_roll(per_sample):
  x = _images(b=32, h=32, w=32)
  out = np.asarray(negative.shift(jax.random.key(2), jnp.asarray(x), per_sample=per_sample))
  shifts = {_recover_shift(xi, oi, 10, 25) for xi, oi in zip(x, out)}
  assert len(shifts) > 5 if per_sample else len(shifts) == 1


def test_shift_official_quirk_matches_numpy_official_code():
  x = _images(b=4, h=32, w=32)
  key = jax.random.key(12)
  s = _recover_shift(x[0], np.asarray(negative.shift(key, jnp.asarray(x), per_sample=False))[0],
                     10, 25)
  quirk = np.asarray(negative.shift(key, jnp.asarray(x), per_sample=False, exact_roll=False))
  np.testing.assert_array_equal(quirk, numpy_ref.shifted(x, shift=s))


# ----------------------------------------------------------------------------
# Builder.
# ----------------------------------------------------------------------------
def test_build_nda_single_equals_direct_call():
  x = jnp.asarray(_images())
  key = jax.random.key(0)
  cfg = ml_collections.ConfigDict({"name": "jigsaw", "probs": None, "params": {
      "jigsaw": {"k": 4}, "cutout": {"min_size": 2, "max_size": 4}}})
  np.testing.assert_array_equal(negative.build_nda(cfg)(key, x), negative.jigsaw(key, x, k=4))
  cfg.name = "cutout"  # switching by name alone picks up that NDA's params
  np.testing.assert_array_equal(negative.build_nda(cfg)(key, x),
                                negative.cutout(key, x, min_size=2, max_size=4))


@pytest.mark.parametrize("cfg,match", [
    ({"name": "jigsw"}, "choose one of .*'cutmix'.*'jigsaw'"),
    ({"name": "jigsaw+blur"}, "'blur'.*choose one of"),
    ({"name": "jigsaw", "params": {"jigsaw": {"size": 3}}}, r"'size'.*valid: \['k', 'layout'\]"),
    ({"name": "jigsaw", "params": {"blur": {}}}, "unknown NDA.*'blur'.*choose from"),
    ({"name": "jigsaw+cutout", "probs": [1.0]}, "one per NDA"),
    ({"name": "jigsaw", "prob": [1.0]}, "valid: \\['name', 'probs', 'params'\\]"),
])
def test_build_nda_errors_name_valid_choices(cfg, match):
  with pytest.raises(ValueError, match=match):
    negative.build_nda(cfg)


def test_build_nda_mixture_frequencies():
  n = 3000
  x = jnp.asarray(_images(b=n, h=4, w=4, c=1))
  cfg = {"name": "rotate+shift", "probs": [1.0, 3.0],
         "params": {"rotate": {"angle": 180.0}, "shift": {"min_shift": 1, "max_shift": 2}}}
  out = np.asarray(jax.jit(negative.build_nda(cfg))(jax.random.key(0), x))
  xn = np.asarray(x)
  rotated = np.all(out == xn[:, ::-1, ::-1], axis=(1, 2, 3))
  rolled = np.all(out == np.roll(xn, (1, 1), axis=(1, 2)), axis=(1, 2, 3))
  assert np.all(rotated ^ rolled)
  assert abs(rotated.mean() - 0.25) < 0.03
