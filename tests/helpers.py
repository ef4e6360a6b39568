"""A small regression problem shared by the tests; the environment of the processes they start."""

import os
from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from optax_sam._src import state as state_lib


def problem(dtype=jnp.float32, seed=0):
  """Params {'kernel', 'bias'} of a tanh layer, a batch, and the loss's gradient function."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (16, 5))
  y = jax.random.normal(k2, (16, 3))
  params = {
    'kernel': (0.5 * jax.random.normal(k3, (5, 3))).astype(dtype),
    'bias': jnp.full((3,), 0.1, dtype),
  }

  def loss(p, x=x, y=y):
    out = jnp.tanh(x.astype(p['kernel'].dtype) @ p['kernel'] + p['bias'])
    return jnp.mean((out - y.astype(out.dtype)) ** 2)

  grad_fn = jax.grad(loss)
  return params, loss, grad_fn


def batch(seed):
  """Another batch ``(x, y)`` of :func:`problem`'s shapes, for its ``loss(p, x, y)``."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (16, 5)), jax.random.normal(k2, (16, 3))


def numpy_grad(grad_fn):
  """The same gradient function on dicts of NumPy arrays."""

  def g(w):
    out = grad_fn({k: jnp.asarray(v, jnp.float32) for k, v in w.items()})
    return {k: np.asarray(v, np.float64) for k, v in out.items()}

  return g


def max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def child_environment() -> dict[str, str]:
  """This environment for a process that chooses its own devices.

  It keeps conftest's compile flags, without conftest's 8 fake devices.
  """
  env = dict(os.environ)
  flags = env.get('XLA_FLAGS', '').split()
  env['XLA_FLAGS'] = ' '.join(f for f in flags if 'xla_force_host_platform_device_count' not in f)
  return env


# ------------------------------------------------------------------------------ the variants


class Variant(NamedTuple):
  """A SAM variant as the tests build it.

  Attributes:
    alias: the optax_sam factory.
    hyperparameters: the tests' values (chosen so that every part of the
      formula changes the result); ``make`` overrides them by keyword.
    reference: the options of :class:`tests.reference.ReferenceSAM`, the
      formulas written out in NumPy, or ``None`` for a variant with its own
      reference (LookSAM, Momentum-SAM: tests/reference_cheap.py).
    base: the base optimizer the variant needs, replacing the test's (preconditioned SAM
      reads Adam's second moment), or ``None``.
  """

  alias: Callable[..., optax.GradientTransformationExtraArgs]
  hyperparameters: dict
  reference: Optional[dict]
  base: Optional[Callable[[], optax.GradientTransformation]] = None

  def make(self, base: optax.GradientTransformation, **options):
    """The variant around ``base`` (or around its own ``base``, when it needs one)."""
    base = base if self.base is None else self.base()
    return self.alias(base, **{**self.hyperparameters, **options})


def _variant(alias, reference=None, base=None, **hyperparameters):
  return Variant(alias, hyperparameters, reference, base)


# The one table of variants, keyed by the example's optimizer names (optax_sam._src.aliases.VARIANTS
# names the aliases; tests/test_architecture.py checks that every one of them is here).
VARIANTS = {
  'sam': _variant(optax_sam.sam, dict(rho=0.1), rho=0.1),
  'usam': _variant(optax_sam.sam, dict(rho=0.3, normalize=False), rho=0.3, normalize=False),
  'asam': _variant(
    optax_sam.asam,
    dict(rho=0.5, adaptive=True, eta=0.01, scaled_keys={'kernel'}),
    rho=0.5,
    eta=0.01,
  ),
  'fsam': _variant(
    optax_sam.friendly_sam,
    dict(rho=0.1, friendly=True, sigma=0.6, lmbda=0.7),
    rho=0.1,
    sigma=0.6,
    lmbda=0.7,
  ),
  'stablesam': _variant(optax_sam.stable_sam, dict(rho=0.3, normalize=False, stable=True), rho=0.3),
  'gsam': _variant(optax_sam.gsam, dict(rho=0.1, gsam_alpha=0.4), rho=0.1, alpha=0.4),
  'fsam+stable': _variant(
    optax_sam.friendly_sam,
    dict(rho=0.1, friendly=True, sigma=0.6, lmbda=0.7, stable=True),
    rho=0.1,
    sigma=0.6,
    lmbda=0.7,
    stable=True,
  ),
  'asam+stable': _variant(
    optax_sam.asam,
    dict(rho=0.5, adaptive=True, eta=0.01, scaled_keys={'kernel'}, stable=True),
    rho=0.5,
    eta=0.01,
    stable=True,
  ),
  'sam+adaptive': _variant(optax_sam.sam, dict(rho=0.3, adaptive=True), rho=0.3, adaptive=True),
  'fsam+adaptive': _variant(
    optax_sam.friendly_sam,
    dict(rho=0.3, friendly=True, sigma=0.5, adaptive=True),
    rho=0.3,
    sigma=0.5,
    adaptive=True,
  ),
  'stablesam+adaptive': _variant(
    optax_sam.stable_sam,
    dict(rho=0.2, normalize=False, stable=True, adaptive=True, eta=0.05),
    rho=0.2,
    adaptive=True,
    eta=0.05,
  ),
  'fsam(defaults)': _variant(
    optax_sam.friendly_sam, dict(rho=0.05, friendly=True, sigma=1.0, lmbda=0.9)
  ),
  'looksam': _variant(optax_sam.look_sam, None, rho=0.1, alpha=0.7, k=2),
  'msam': _variant(optax_sam.momentum_sam, None, rho=0.3),
  # Checked against their authors' code in tests/test_family.py (trajectories in tests/official).
  'wsam': _variant(optax_sam.wsam, None, rho=0.1, gamma=0.8, learning_rate=0.1),
  'wsam(coupled)': _variant(optax_sam.wsam, None, rho=0.1, gamma=0.8, decouple=False, max_norm=0.5),
  'vasso': _variant(optax_sam.vasso, None, rho=0.1, theta=0.4),
  'gcsam': _variant(optax_sam.gcsam, None, rho=0.1),
  'unifiedsam': _variant(optax_sam.unified_sam, None, rho=0.1, lmbda=0.5),
  'lookbehind': _variant(optax_sam.lookbehind_sam, None, rho=0.1, k=2, alpha=0.5),
  'sam-on': _variant(optax_sam.sam, None, rho=0.1, perturb_mask={'kernel': False, 'bias': True}),
  # Its own step shape: both gradients in one update, the gradient argument unused
  # (tests/test_parallel.py, against the authors' code).
  'sampa': _variant(optax_sam.sampa, None, rho=0.1, lmbda=0.2),
  # Reads the base optimizer's second moment: around Adam whatever the test's base
  # (tests/test_functional.py checks it against the formula).
  # Random weight perturbation: noise from the key in its state, the two gradients mixed
  # (tests/test_random_weights.py checks it against the formula given the same noise).
  'mrwp': _variant(optax_sam.mrwp, None, sigma=0.1, lmbda=0.5),
  # m-ARWP: the noise shrunk by the squared perturbed gradients in the correction's memory.
  'marwp': _variant(optax_sam.marwp, None, sigma=0.1, lmbda=0.5, eta=2.0, beta=0.8),
  'psam': _variant(
    optax_sam.preconditioned_sam, None, base=lambda: optax.adamw(0.01, weight_decay=0.1), rho=0.1
  ),
  # Its own optimizer (no base) and step shape: the clean gradient at a posterior sample, both
  # gradients in one update (tests/test_variational.py, against the authors' JAX code).
  'bsam': _variant(lambda base, **kw: optax_sam.bsam(0.1, **kw), None, rho=0.05, data_size=100.0),
}
# The variants of the SAM wrapper, each with both calling modes and when= (Momentum-SAM takes no
# grad_fn; Lookbehind-SAM's cycle, SAMPa's parallel pair and bSAM's variational step are their own
# step shapes).
OWN_STEP = ('msam', 'lookbehind', 'sampa', 'bsam')
WRAPPED = tuple(name for name in VARIANTS if name not in OWN_STEP)
# One of each part: the perturbations and corrections (and their combinations) the aliases name.
CORE = ('sam', 'usam', 'asam', 'fsam', 'stablesam', 'gsam', 'fsam+stable', 'asam+stable')
# The variants grown from parts after the core (issue 26), each checked against its authors' code.
FAMILY = ('wsam', 'wsam(coupled)', 'vasso', 'gcsam', 'unifiedsam', 'sam-on')


def grad_fn_for(state, grad_fn) -> dict:
  """``{'grad_fn': grad_fn}`` for a one-call state; ``{}`` for a two-phase one, which refuses it."""
  two_phase = state_lib.find_states(state, optax_sam.TwoPhaseSAMState)
  return {} if two_phase else {'grad_fn': grad_fn}


def assert_bf16_steps(tx, params, grad_fn, steps: int = 3) -> None:
  """``steps`` jitted steps of ``tx`` (called ``update(None, ...)``) on ``params`` in bfloat16: the
  state keeps its dtypes, the params stay bfloat16, and the step compiles once."""
  low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  state = tx.init(low)
  step = jax.jit(lambda w, s: tx.update(None, s, w, grad_fn=grad_fn))
  for _ in range(steps):
    u, new_state = step(low, state)
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
    state, low = new_state, optax.apply_updates(low, u)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(low))
  assert step._cache_size() == 1
