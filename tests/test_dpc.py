"""The DPC method: 1 vs 8 devices, candidate groups, NDA negatives never equal to positives,
main trains / checkpoints / resumes exactly. The model is tiny (configs/demo_video.py:tiny),
but a DPC train step still takes a minute or two to compile on XLA:CPU."""
import json
import os
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from configs import demo_video
from nda_jax import images as images_lib
from nda_jax import logs
from nda_jax import losses
from nda_jax import optim
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.data import sources
from nda_jax.models import dpc as dpc_model
from nda_jax.trainers import dpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_NDAS = "+".join(dpc.NDAS)


def tiny_config(**overrides):
  c = demo_video.get_config("tiny")
  c.checkpoint.async_save = False
  c.update_from_flattened_dict(overrides)
  return c


def _clips(c, n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, c.data.num_frames, c.data.image_size, c.data.image_size, 3),
                      dtype=np.uint8)


# ------------------------------------------------------------------ devices
def test_one_device_equals_eight():
  """Two steps on 1 device and on 8: the same metrics, weights and BN averages.

  Candidate and BN groups of 8 clips of 16: on 1 device two local candidate groups, on 8
  devices (2 clips each) each group gathered from 4 devices; NDA negatives of two kinds.
  SGD, not Adam: Adam's first step is lr * sign(g), which turns float noise in near-zero
  gradients into full steps. Stated tolerance: metrics rtol 1e-5; each variable's change
  from its initial value agrees within 1e-4 (step 1) and 2e-3 (step 2) of the largest
  change of that variable (measured: 3e-5 and 5e-4; float32 summation order, amplified by
  BN over groups of 8 and a large lr). A wrong gradient path (e.g. the gathered
  candidates' gradient not flowing back) would be off by O(1).
  """
  sgd = optim.default_config("sgd")
  sgd.lr, sgd.momentum = 0.1, 0.0
  c = tiny_config(**{"optim.encoder": sgd})
  batches = [{"image": _clips(c, 16, seed)} for seed in range(2)]
  method = trainers.get_method(c, 1000)
  initial = jax.device_get(method.init_state(jax.random.PRNGKey(0)))   # host copy: steps donate
  runs = []
  for devices in (1, 8):
    method.validate(devices)
    dp = parallel.DataParallel("shard_map", devices)
    state = dp.put_state(initial)
    step = dp.step(method.make_step())
    run = []
    for batch in batches:
      state, m = step(state, dp.shard_batch(batch))
      jax.block_until_ready(m)
      run.append((jax.device_get(dp.get_state(state)), dp.unreplicate_metrics(m)))
    runs.append(run)
  assert set(runs[0][0][1]) == {"loss", "top1", "acc_same_clip", "acc_other_clips", "acc_nda",
                                "lr"}
  assert runs[0][0][1]["loss"] != runs[0][1][1]["loss"]
  for (one, m1), (eight, m8), tolerance in zip(*runs, (1e-4, 2e-3)):
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)
    for name in ("params", "batch_stats"):
      for x0, x1, x8 in zip(*(jax.tree.leaves(getattr(s, name)) for s in (initial, one, eight))):
        change = np.abs(x1 - x0).max()
        assert change > 0
        np.testing.assert_allclose(x1 - x0, x8 - x0, atol=tolerance * change, err_msg=name)


# ------------------------------------------------------------------ candidate groups
@pytest.mark.parametrize("group_size", [0, 1, 4])
def test_candidates_come_from_the_clip_s_group(group_size):
  """dense_loss on 8 devices (2 clips each) == dpc_dense_loss on each group, averaged."""
  c = tiny_config(**{"dpc.candidate_group_size": group_size})
  rng = np.random.default_rng(group_size)
  pred, target, nda = (jnp.asarray(rng.standard_normal((16, 2, 3, 4)), jnp.float32)
                       for _ in range(3))
  dp = parallel.DataParallel("shard_map", 8)
  spec = jax.sharding.PartitionSpec(parallel.AXIS)

  def per_device(p, t, a):
    loss, metrics = dpc.dense_loss(c, p, t, a, 16)
    return jax.lax.pmean((loss, metrics), parallel.AXIS)

  mapped = dp.map_fn(per_device, in_specs=(spec,) * 3, out_specs=jax.sharding.PartitionSpec())
  loss, metrics = mapped(*dp.shard_batch((pred, target, nda)))
  size = group_size or 16
  parts = [losses.dpc_dense_loss(pred[g:g + size], target[g:g + size], nda=nda[g:g + size])
           for g in range(0, 16, size)]
  np.testing.assert_allclose(loss, np.mean([p[0] for p in parts]), rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(metrics[k], np.mean([p[1][k] for p in parts]), rtol=1e-5)


def test_bad_group_sizes_and_frames_are_rejected():
  with pytest.raises(ValueError, match="candidate_group_size"):
    trainers.get_method(tiny_config(**{"dpc.candidate_group_size": 6})).validate(1)
  with pytest.raises(ValueError, match="candidate_group_size"):   # 3 clips per device
    trainers.get_method(tiny_config(**{"train.batch_size": 24,
                                       "dpc.candidate_group_size": 2})).validate(8)
  with pytest.raises(ValueError, match="num_frames"):
    trainers.get_method(tiny_config(**{"data.num_frames": 10})).validate(1)


@pytest.mark.parametrize("config_file", ["demo_video.py:tiny", "ucf101_dpc.py",
                                         "demo_video_probe.py", "ucf101_finetune.py"])
def test_num_frames_follows_overrides_of_the_blocks(config_file):
  """data.num_frames is derived from model.num_seq x model.seq_len: command-line overrides of
  either move it, config.json holds the plain number, and an override of it wins."""
  path = os.path.join(REPO, "configs", config_file)
  argv = ["prog", f"--config={path}", "--config.model.num_seq=6", "--config.model.seq_len=3"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  c = flag_values.config
  assert (c.model.num_seq, c.model.seq_len, c.data.num_frames) == (6, 3, 18)
  assert json.loads(c.to_json_best_effort())["data"]["num_frames"] == 18
  c.data.num_frames = 7
  c.model.num_seq = 2
  assert c.data.num_frames == 7


# ------------------------------------------------------------------ NDA negatives
@pytest.mark.parametrize("name", ["clip_stitch", "temporal_shuffle", "spatial_jigsaw+clip_stitch"])
def test_ndas_that_keep_real_blocks_are_rejected(name):
  with pytest.raises(ValueError, match="real blocks"):
    dpc.nda_spec(tiny_config(**{"nda.name": name}))


def test_block_len_follows_seq_len():
  spec = dpc.nda_spec(tiny_config(**{"nda.name": "block_reverse+block_frame_shuffle"}))
  assert spec["params"]["block_reverse"]["block_len"] == 2
  assert spec["params"]["block_frame_shuffle"]["block_len"] == 2
  c = tiny_config(**{"nda.name": "block_reverse"})
  c.nda.params["block_reverse"] = {"block_len": 4}
  with pytest.raises(ValueError, match="block_len"):
    dpc.nda_spec(c)


def test_no_nda_feature_equals_its_positive():
  """Moving digits (black background), augmented as in training, NDAs of every allowed kind:
  no NDA block is any real block, and no NDA feature is its prediction's positive."""
  c = tiny_config(**{"nda.name": ALL_NDAS})
  method = trainers.get_method(c)
  state = method.init_state(jax.random.PRNGKey(0))
  clips_u8 = sources.make_source(c.data, "test")
  clips_u8 = np.stack([clips_u8[i]["image"] for i in range(16)])
  keys = jax.random.split(jax.random.PRNGKey(3), 16)
  clips = jax.jit(lambda k, x: dpc.augment(c, k, images_lib.to_float(x)))(keys, clips_u8)
  kinds = jax.random.split(jax.random.PRNGKey(4), 16)
  nda = jax.jit(dpc.make_nda_fn(c, axis_name=None))(kinds, clips)
  m = c.model
  assert nda.shape == (16, m.pred_step * m.seq_len) + clips.shape[2:]

  blocks = lambda x: np.asarray(x).reshape(-1, m.seq_len, *x.shape[2:])
  real, fake = blocks(clips), blocks(nda)
  same = (real[:, None] == fake[None]).reshape(len(real), len(fake), -1).all(-1)
  assert not same.any()

  model = dpc.build_model(c)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  encode = jax.jit(lambda x: model.apply(variables, images_lib.normalize_input(c, x),
                                         method=dpc_model.DPC.encode))
  d = 4 * m.width
  target = np.asarray(encode(clips)[:, m.num_seq - m.pred_step:]).reshape(16, -1, d)
  nda_features = np.asarray(encode(nda)).reshape(16, -1, d)
  assert target.shape == nda_features.shape
  # Every NDA feature of a clip against every positive of that clip (scope 'all' covers both).
  distance = np.linalg.norm(target[:, :, None] - nda_features[:, None], axis=-1)
  scale = np.linalg.norm(target, axis=-1)[:, :, None]
  assert (distance > 1e-3 * scale).all(), (distance / scale).min()


# ------------------------------------------------------------------ main: train, checkpoint, resume
def _main(workdir, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, "-m", "nda_jax.main", f"--config={REPO}/configs/demo_video.py:tiny",
       f"--workdir={workdir}", "--config.checkpoint.async_save=False", *flags],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_main_trains_checkpoints_and_resumes_exactly(tmp_path):
  split = tmp_path / "split"
  _main(split, "--config.train.total_steps=2")
  log = _main(split)
  assert "resumed from step 2" in log
  records = logs.read_metrics(str(split))
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == [1, 2, 3, 4]                 # the second run started at step 3
  assert all(np.isfinite(r["loss"]) and r["img_per_sec"] > 0 for r in records if "loss" in r)
  knn = [r for r in records if "knn_top1" in r]
  assert [r["step"] for r in knn] == [2, 4]      # at the end of each run
  assert all(0 <= r["knn_top1"] <= 1 for r in knn)
  assert json.load(open(split / "config.json"))["trainer"] == "dpc"

  straight = tmp_path / "straight"   # the same process set-up (2 devices), without a restart
  _main(straight)
  c = tiny_config()
  a = trainers.load_run(str(straight), config=c)[2]
  b = trainers.load_run(str(split), config=c)[2]
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
