"""A method that knows nothing of GANs: softmax regression on the digits.

Used by tests/test_loop.py to show that the generic loop (checkpoints,
resume, signals, NaN guard, evaluators) works for any method. Registered as
`config.trainer = 'toy'` by the tests.
"""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nda_jax import evaluators
from nda_jax import images as images_lib
from nda_jax import optim
from nda_jax import parallel
from nda_jax.trainers import method as method_lib


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  rng: jax.Array
  params: dict
  opt: optax.OptState


class Toy(method_lib.Method):

  def _tx(self):
    return optim.build(self.config.optim, steps_per_epoch=self.steps_per_epoch,
                       total_steps=max(self.total_steps, 1))

  def init_state(self, rng):
    d = self.config.data
    params = {"w": jnp.zeros((d.image_size ** 2 * d.channels, d.num_classes)),
              "b": jnp.zeros((d.num_classes,))}
    return ToyState(step=jnp.zeros((), jnp.int32), rng=rng, params=params,
                    opt=self._tx().init(params))

  def make_step(self):
    tx = self._tx()

    def step(state, batch):
      x = images_lib.to_float(batch["image"]).reshape(batch["image"].shape[0], -1)

      def loss_fn(params):
        logits = x @ params["w"] + params["b"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits.argmax(-1) == batch["label"]).mean()

      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads = jax.lax.pmean(grads, parallel.AXIS)
      updates, opt = tx.update(grads, state.opt, state.params)
      new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt=opt)
      return new, jax.lax.pmean({"loss": loss, "accuracy": accuracy}, parallel.AXIS)
    return step

  def make_eval_fns(self, dp):
    @jax.jit
    def embed(state, images_u8):
      x = images_lib.to_float(images_u8).reshape(images_u8.shape[0], -1)
      return x @ state.params["w"]
    return {"embed_fn": embed}


def get_config(arg=None):
  """The toy run: 8x8 digits, batch 32, plain SGD; `arg='knn'` adds a kNN evaluator
  (every 2 steps, k=5), so that a run on the command line has a metric to keep the best by."""
  c = ml_collections.ConfigDict()
  c.trainer = "toy"
  c.seed = 0
  c.parallel = "shard_map"
  c.max_devices = 0
  c.data = ml_collections.ConfigDict(dict(name="digits", train_split="train", eval_split="test",
                                          image_size=8, channels=3, num_classes=10,
                                          read_threads=1, worker_count=0))
  c.optim = optim.default_config("sgd")
  c.optim.lr = 0.02
  c.optim.momentum = 0.0
  c.train = ml_collections.ConfigDict(dict(batch_size=32, total_steps=6, num_epochs=0,
                                           log_every=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=2, keep=5, keep_best=0, best_metric="",
                                                best_mode="min", async_save=False))
  c.evals = ml_collections.ConfigDict()
  if arg == "knn":
    c.evals.knn = evaluators.default_config("knn")
    c.evals.knn.update(every=2, k=5)
  return c
