"""Sample-quality metrics on features: FID, Inception Score, KID (host NumPy, float64).

The formulas are those of the reference implementations, so numbers are
comparable with published ones:
  * FID: TTUR / pytorch-fid `calculate_frechet_distance` (scipy `sqrtm`,
    an eps*I offset when the product of covariances is singular, the real
    part kept unless the imaginary part of the diagonal is large);
  * IS: OpenAI's `improved-gan` code (10 consecutive splits, exp of the mean
    KL(p(y|x) || p(y)) per split, mean and std over splits);
  * KID: Binkowski et al. 2018 / torch-fidelity (unbiased MMD^2 with the
    kernel (x.y / d + 1)^3 over random subsets, mean and std);
  * precision / recall (Kynkaanniemi et al. 2019) and density / coverage
    (Naeem et al. 2020): the `prdc` package's `compute_prdc` (one nearest_k
    for all four, a point's radius the distance to its k-th neighbour within
    its own set, strict `<` comparisons).
Statistics files are `.npz` with `mu` [D] and `sigma` [D, D], the TTUR and
pytorch-fid format, so their published files load as they are.
"""
from collections.abc import Mapping
import io

from etils import epath
import numpy as np
from scipy import linalg

STATS_KEYS = ("mu", "sigma")


# ----------------------------------------------------------------------------- FID
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"Statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}.")
  if sigma1.shape != mu1.shape * 2:
    raise ValueError(f"sigma {sigma1.shape} does not match mu {mu1.shape}.")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # Singular product: regularise both covariances as pytorch-fid does.
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm(S1 S2) has a large imaginary component ({max_imag:.3g}); "
                       f"the covariances are too ill-conditioned (too few samples?).")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class GaussianStats:
  """Running mean and covariance of feature batches, float64 on the host.

  Sums are taken around the first batch's mean (a shift that cancels exactly),
  which keeps the one-pass covariance accurate when |mu| >> std. `sigma` is the
  unbiased covariance (N - 1), as `np.cov(rowvar=False)` in pytorch-fid.
  """

  def __init__(self):
    self.count = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"Expected features [N, D], got shape {x.shape}.")
    if not len(x):
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    elif x.shape[1] != self._shift.shape[0]:
      raise ValueError(f"Feature dimension changed from {self._shift.shape[0]} to {x.shape[1]}.")
    x = x - self._shift
    self.count += len(x)
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x

  @property
  def mu(self) -> np.ndarray:
    self._check(1)
    return self._shift + self._sum / self.count

  @property
  def sigma(self) -> np.ndarray:
    self._check(2)
    mean = self._sum / self.count
    return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  def _check(self, minimum: int) -> None:
    if self.count < minimum:
      raise ValueError(f"Need at least {minimum} feature vectors, have {self.count}.")


def intra_class_frechet(fake: Mapping[int, tuple[np.ndarray, np.ndarray]],
                        real: Mapping[int, tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[float, dict[int, float]]:
  """StudioGAN's intra-class FID: the mean over classes of the Fréchet distance between
  the class's generated and real (mu, sigma); returns (mean, {class: distance})."""
  if sorted(fake) != sorted(real) or not fake:
    raise ValueError(f"classes of the samples {sorted(fake)} and of the reference "
                     f"{sorted(real)} differ")
  per_class = {c: frechet_distance(*fake[c], *real[c]) for c in sorted(fake)}
  return float(np.mean(list(per_class.values()))), per_class


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes TTUR / pytorch-fid compatible `.npz` statistics (float64), locally or to gs://."""
  buffer = io.BytesIO()
  np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a TTUR / pytorch-fid / `save_stats` `.npz` file."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(
        f"No statistics file at {path!r}. Compute one with `python -m nda_jax.evaluators.ref_stats "
        f"--data=... --out={path}`, or use TTUR's / the NDA repo's published `.npz` files.")
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
    missing = [k for k in STATS_KEYS if k not in f.files]
    if missing:
      raise ValueError(f"{path!r} lacks {missing}; a statistics file has keys {STATS_KEYS}, "
                       f"found {f.files}.")
    mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D].")
  return mu, sigma


# ----------------------------------------------------------------------------- IS
def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` consecutive splits of exp(E_x KL(p(y|x) || p(y))).

  `logits` [N, K] are turned into p(y|x) by a float64 softmax; pass the FID
  Inception's `logits_unbiased` for the standard IS.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"Need logits [N >= splits={splits}, K], got shape {logits.shape}.")
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, splits):
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0))
    kl = (p * (part - log_py)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- KID
def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
  """Unbiased MMD^2 between samples x [m, d] and y [m, d] with k(a, b) = (a.b / d + coef0)^degree."""
  m, d = x.shape
  if y.shape != (m, d):
    raise ValueError(f"Unbiased MMD here needs equal-size samples, got {x.shape} and {y.shape}.")
  k_xx = (x @ x.T / d + coef0) ** degree
  k_yy = (y @ y.T / d + coef0) ** degree
  k_xy = (x @ y.T / d + coef0) ** degree
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """(mean, std) of the unbiased polynomial MMD^2 over random subsets (without replacement)."""
  f1 = np.asarray(features1, np.float64)
  f2 = np.asarray(features2, np.float64)
  size = min(subset_size, len(f1), len(f2))
  if size < 2:
    raise ValueError(f"KID needs >= 2 features per set, got {len(f1)} and {len(f2)}.")
  rng = np.random.RandomState(seed)
  mmds = [polynomial_mmd2(f1[rng.choice(len(f1), size, replace=False)],
                          f2[rng.choice(len(f2), size, replace=False)])
          for _ in range(num_subsets)]
  return float(np.mean(mmds)), float(np.std(mmds))


# ----------------------------------------------------------------------------- PRDC
PRDC_KEYS = ("precision", "recall", "density", "coverage")


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
  return np.maximum(d, 0.0)


def _kth_neighbour_sq_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row (the (k+1)-th counting itself)."""
  return np.concatenate([np.partition(_squared_distances(x[i:i + chunk], x), k, axis=1)[:, k]
                         for i in range(0, len(x), chunk)])


def prdc(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5,
         chunk: int = 1024) -> dict[str, float]:
  """{precision, recall, density, coverage} of `fake` [M, D] against `real` [N, D].

  precision: fraction of fakes inside some real point's k-NN ball; recall: of
  reals inside some fake's ball; density: mean number of real balls holding a
  fake, / k; coverage: fraction of real balls holding at least one fake.
  Float64, `chunk` real rows at a time (never the whole N x M matrix), squared
  distances compared (the same order as the distances).
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"PRDC needs features [N, D] and [M, D], got {real.shape} and {fake.shape}.")
  if nearest_k < 1 or min(len(real), len(fake)) <= nearest_k:
    raise ValueError(f"nearest_k={nearest_k} needs more than {nearest_k} real and fake features, "
                     f"got {len(real)} and {len(fake)}.")
  real_r = _kth_neighbour_sq_radii(real, nearest_k, chunk)
  fake_r = _kth_neighbour_sq_radii(fake, nearest_k, chunk)
  fake_inside = np.zeros(len(fake), bool)     # precision
  balls_per_fake = np.zeros(len(fake))         # density
  real_recalled, real_covered = [], []
  for i in range(0, len(real), chunk):
    d = _squared_distances(real[i:i + chunk], fake)
    in_real_ball = d < real_r[i:i + chunk, None]
    fake_inside |= in_real_ball.any(0)
    balls_per_fake += in_real_ball.sum(0)
    real_recalled.append((d < fake_r[None, :]).any(1))
    real_covered.append(in_real_ball.any(1))
  return {"precision": float(fake_inside.mean()),
          "recall": float(np.concatenate(real_recalled).mean()),
          "density": float(balls_per_fake.mean() / nearest_k),
          "coverage": float(np.concatenate(real_covered).mean())}
