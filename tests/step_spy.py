"""What the loop hands a method's train step (recorded while the step is traced)."""


def record_batches(monkeypatch, method_cls) -> list:
  """Patches method_cls.make_step; the returned list receives (dtype, shape) of each batch's images."""
  seen = []
  make_step = method_cls.make_step

  def recording_make_step(self):
    step = make_step(self)

    def wrapped(state, batch):
      seen.append((batch["image"].dtype, batch["image"].shape))
      return step(state, batch)
    return wrapped
  monkeypatch.setattr(method_cls, "make_step", recording_make_step)
  return seen
