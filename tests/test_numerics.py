"""Every variant against the independent NumPy reference, over several steps, in both modes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers
from tests.reference import ReferenceSAM, global_norm

LR, MOMENTUM, STEPS = 0.1, 0.9, 5

# name: (factory of the optax_sam optimizer, ReferenceSAM options), from the shared table
VARIANTS = {n: (v.make, v.reference) for n, v in helpers.VARIANTS.items() if v.reference}


def run_library(make, two_phase, steps=STEPS):
  params, _, grad_fn = helpers.problem()
  tx = make(optax.sgd(LR, momentum=MOMENTUM), two_phase=two_phase)
  state = tx.init(params)
  history = []
  if two_phase:
    update = jax.jit(tx.update)
    for _ in range(steps):
      for _phase in range(2):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
      history.append(params)
  else:
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    for _ in range(steps):
      updates, state = update(grad_fn(params), state, params)
      params = optax.apply_updates(params, updates)
      history.append(params)
  return history


def run_reference(options, steps=STEPS):
  params, _, grad_fn = helpers.problem()
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  ref = ReferenceSAM(helpers.numpy_grad(grad_fn), lr=LR, momentum=MOMENTUM, **options)
  history = []
  for _ in range(steps):
    w = ref.step(w)
    history.append(w)
  return history


@pytest.mark.parametrize('two_phase', [False, True], ids=['one_call', 'two_phase'])
@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_matches_reference_every_step(name, two_phase):
  make, options = VARIANTS[name]
  got = run_library(make, two_phase)
  want = run_reference(options)
  for step, (g, w) in enumerate(zip(got, want, strict=True)):
    assert helpers.max_diff(g, w) < 2e-5, f'step {step}'
  # The step must actually differ from plain SGD, or the comparison proves nothing.
  sgd = run_reference(dict(options, rho=0.0))
  assert helpers.max_diff(want[-1], sgd[-1]) > 1e-3


def test_fsam_sigma_matters_after_first_step():
  """F-SAM's first step is SAM's (d = g); from the second on, sigma changes the path."""
  make_fsam = lambda s: lambda b, **k: optax_sam.friendly_sam(b, rho=0.1, sigma=s, **k)
  a = run_library(make_fsam(0.0), False, steps=2)
  b = run_library(make_fsam(1.0), False, steps=2)
  plain = run_library(lambda b, **k: optax_sam.sam(b, rho=0.1, **k), False, steps=2)
  assert helpers.max_diff(a[0], b[0]) == 0.0
  assert helpers.max_diff(a[1], plain[1]) < 1e-7  # sigma = 0 is SAM
  assert helpers.max_diff(a[1], b[1]) > 1e-4


def test_hand_worked_sam_step():
  """One SAM step on L(w) = sum(w^4), worked by hand."""
  w = np.array([1.0, -2.0], np.float32)
  grad = lambda v: 4 * v**3
  g = grad(w)
  e = 0.1 * g / np.linalg.norm(g)
  expected = w - 0.5 * grad(w + e)
  tx = optax_sam.sam(optax.sgd(0.5), rho=0.1)
  jgrad = jax.grad(lambda v: (v**4).sum())
  u, _ = tx.update(jgrad(w), tx.init(w), w, grad_fn=jgrad)
  np.testing.assert_allclose(optax.apply_updates(w, u), expected, rtol=1e-6)


@pytest.mark.parametrize('scale', [1.0, 1e33], ids=['normal', 'overflowing_squares'])
def test_norms_stay_accurate_for_millions_of_parameters(scale):
  """``||e|| = rho`` and StableSAM's ``||g_sam|| = ||g||`` to float32 rounding for 4M entries.

  A norm summed sequentially (as a general ``lax.reduce`` is on CPU) drifts by
  1e-4 at this size; a tree reduction stays near 1e-7. With ``scale = 1e33`` the
  squares overflow float32 and the rescaled path is measured.
  """
  rng = np.random.default_rng(0)
  tree = lambda: {
    k: jnp.asarray(scale * (rng.normal(size=(2000, 1000)) + 1), jnp.float32) for k in 'ab'
  }
  g, g_adv = tree(), tree()
  ascent = optax_sam.ascent(rho=0.05)
  e, _ = ascent.update(g, ascent.init(g), g)
  assert abs(global_norm(e) / 0.05 - 1) < 1e-6
  stable = optax_sam.stable_correction()
  g_sam = stable.apply(stable.prepare(g, g), g_adv, g_adv)
  assert abs(global_norm(g_sam) / global_norm(g) - 1) < 1e-6
