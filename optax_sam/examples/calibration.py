"""Calibration of the example's models: the expected calibration error, at the mean and averaged.

After training, :func:`calibrate` measures the test set's expected calibration error (ECE) of the
trained weights, and for ``bsam`` also the accuracy, ECE and negative log-likelihood of the model
average over samples of its posterior (:func:`optax_sam.posterior_samples`): the predicted
probabilities averaged over the samples, as the bSAM authors' ``test.py --testmc``.
"""

from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

import optax_sam
from optax_sam.examples import data as data_lib

ECE_BINS = 15  # equal-width confidence bins


def expected_calibration_error(
  probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
  """Expected calibration error of the top class, over ``bins`` equal-width confidence bins.

  The mean over bins, weighted by their share of the examples, of ``|accuracy - confidence|``.

  Example:
    >>> import numpy as np
    >>> from optax_sam.examples import calibration
    >>> probs = np.array([[0.9, 0.1], [0.9, 0.1]])  # confidence 0.9, half right
    >>> round(calibration.expected_calibration_error(probs, np.array([0, 1])), 6)
    0.4
  """
  confidence, predicted = probs.max(-1), probs.argmax(-1)
  correct = (predicted == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
  ece = 0.0
  for b in range(bins):
    inside = which == b
    if inside.any():
      ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
  return float(ece)


@nnx.jit
def _probabilities(model: nnx.Module, x: jax.Array) -> jax.Array:
  return jax.nn.softmax(model(x), axis=-1)


def probabilities(model: nnx.Module, x: np.ndarray) -> np.ndarray:
  """The softmax of ``model`` in inference mode (running statistics, no dropout) on ``x``."""
  eval_model = nnx.view(model, deterministic=True, use_running_average=True)
  labels = np.zeros(len(x), np.int32)
  out = []
  for xb, _, mask in data_lib.eval_batches(x, labels, data_lib.EVAL_BATCH_SIZE):
    out.append(np.asarray(_probabilities(eval_model, xb))[mask > 0])
  return np.concatenate(out)


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  likelihood = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
  return {
    'test_accuracy': float(np.mean(probs.argmax(-1) == labels)),
    'test_ece': expected_calibration_error(probs, labels),
    'test_nll': float(-np.mean(np.log(likelihood))),
  }


def calibrate(
  model: nnx.Module,
  opt_state: Any,
  x: np.ndarray,
  y: np.ndarray,
  num_samples: int,
  seed: int,
) -> dict[str, Any]:
  """The test set's scores at the trained weights, and over posterior samples if asked.

  Args:
    model: the trained model (at its clean weights).
    opt_state: its optimizer's pure state (for bSAM, holding its posterior).
    x, y: the test set.
    num_samples: posterior samples to average (0: the trained weights only).
    seed: the seed of the samples' key.

  Returns:
    ``{'mean': {test_accuracy, test_ece, test_nll}}`` and, with samples,
    ``'model_average'`` (the same scores and ``samples``).
  """
  result: dict[str, Any] = {'mean': _scores(probabilities(model, x), y)}
  if not num_samples:
    return result
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  samples = optax_sam.posterior_samples(params, opt_state, jax.random.key(seed), num_samples)
  copy = nnx.clone(model)  # a new module: the trained model keeps its mean
  total: Optional[np.ndarray] = None
  for i in range(num_samples):
    nnx.update(copy, jax.tree.map(lambda s, i=i: s[i], samples))
    probs = probabilities(copy, x)
    total = probs if total is None else total + probs
  result['model_average'] = _scores(total / num_samples, y) | {'samples': num_samples}
  return result


def describe(scores: dict[str, Any]) -> str:
  """One line of :func:`calibrate`'s scores."""
  mean = scores['mean']
  line = f'test ECE {mean["test_ece"]:.4f}, NLL {mean["test_nll"]:.4f} at the trained weights'
  if 'model_average' in scores:
    avg = scores['model_average']
    line += (
      f'; model average of {avg["samples"]} posterior samples: test acc '
      f'{avg["test_accuracy"]:.4f}, ECE {avg["test_ece"]:.4f}, NLL {avg["test_nll"]:.4f}'
    )
  return line
