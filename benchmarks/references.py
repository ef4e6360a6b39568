"""Hand-written one-call steps with each variant's math and nothing else.

They are not targets of the issue (the target is the minimal SAM step in
:mod:`benchmarks.cases`); they tell apart what a variant's math costs (an extra
reduction, GSAM keeping the clean gradient through the second pass, F-SAM's
EMA) from what the library adds on top of it. Each is written directly with
``jax.tree.map`` and ``optax.tree`` reductions, without optax_sam, using the
same hyperparameters as the aliases' defaults in :mod:`benchmarks.cases`.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from benchmarks.models import Model

RHO = 0.05
ASAM_RHO, ASAM_ETA = 0.5, 0.01
SIGMA, LMBDA = 1.0, 0.9
ALPHA = 0.4
EPS = 1e-12
THETA, VASSO_EPS = 0.9, 1e-7  # VaSSO's defaults
UNIFIED_RHO = 0.1  # unified_sam's default radius (its default lmbda = 1 is SAM's ascent)
WSAM_WEIGHT = 0.9 / (1 - 0.9)  # WSAM's gamma / (1 - gamma) at gamma = 0.9
MRWP_SIGMA, MRWP_LMBDA = 0.01, 0.5  # mrwp's defaults
MARWP_ETA, MARWP_BETA = 1.0, 0.9  # marwp's defaults (its sigma and lmbda are mrwp's)
LOOKBEHIND_K, LOOKBEHIND_ALPHA, LOOKBEHIND_EPS = 5, 0.5, 1e-16  # lookbehind_sam's defaults
LEARNING_RATE = 0.1  # benchmarks.cases.LEARNING_RATE, WSAM's decoupled term's rate
SAMPA_RHO, SAMPA_LMBDA = 0.1, 0.2  # sampa's defaults
BSAM_RHO, BSAM_BETA1, BSAM_BETA2 = 0.1, 0.9, 0.999  # bsam's defaults
BSAM_PRIOR, BSAM_DAMPING, BSAM_S0 = 25.0, 0.1, 1.0  # bsam's defaults
BSAM_DATA_SIZE = 50_000.0  # benchmarks.cases.BSAM_DATA_SIZE (CIFAR-10's training set)


class Math(NamedTuple):
  """A variant's math in plain JAX.

  Attributes:
    ascent: ``ascent(g, params, state) -> (e, new_state)``.
    correction: ``correction(g, g_adv) -> g_sam``.
    init: ``init(params) -> state`` of the ascent (``()`` when there is none).
    outside: ``outside(g, g_adv) -> updates`` added to the base optimizer's (WSAM's decoupled
      term), or ``None``.
    observe: ``observe(state, g_adv) -> state``: the ascent's state after the perturbed
      gradient (m-ARWP's F), or ``None``.
  """

  ascent: Callable
  correction: Callable
  init: Callable
  outside: Optional[Callable] = None
  observe: Optional[Callable] = None


def _normalized(g, rho):
  scale = rho / (optax.tree.norm(g) + EPS)
  return jax.tree.map(lambda x: scale * x, g)


def _sam_ascent(g, params, state):
  del params
  return _normalized(g, RHO), state


def _usam_ascent(g, params, state):
  del params
  return jax.tree.map(lambda x: RHO * x, g), state


def _asam_ascent(g, params, state):
  """T = |w| + eta on every leaf but those named bias; e = rho T^2 g / ||T g||."""
  scale = jax.tree_util.tree_map_with_path(
    lambda path, w: jnp.ones_like(w) if path[-1].key == 'bias' else jnp.abs(w) + ASAM_ETA, params
  )
  norm = optax.tree.norm(jax.tree.map(lambda x, t: t * x, g, scale))
  factor = ASAM_RHO / (norm + EPS)
  return jax.tree.map(lambda x, t: factor * t * t * x, g, scale), state


def _fsam_ascent(g, params, state):
  """d = g - sigma m (d = g at the first step), m <- lmbda m + (1 - lmbda) g; e = SAM's on d."""
  del params
  count, ema = state
  first = count == 0
  d = jax.tree.map(lambda x, m: jnp.where(first, x, x - SIGMA * m), g, ema)
  ema = jax.tree.map(lambda x, m: jnp.where(first, x, LMBDA * m + (1 - LMBDA) * x), g, ema)
  return _normalized(d, RHO), (count + 1, ema)


def _fsam_init(params):
  return jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params)


def _identity(g, g_adv):
  del g
  return g_adv


def _stable(g, g_adv):
  ratio = optax.tree.norm(g) / (optax.tree.norm(g_adv) + EPS)
  return jax.tree.map(lambda x: ratio * x, g_adv)


def _gsam(g, g_adv):
  coef = optax.tree.vdot(g, g_adv) / (optax.tree.norm(g_adv, squared=True) + EPS)
  return jax.tree.map(lambda a, x: a - ALPHA * (x - coef * a), g_adv, g)


def _vasso_ascent(g, params, state):
  """d = g at the first step, then (1 - theta) d + theta g; e = rho d / (||d|| + 1e-7)."""
  del params
  count, d = state
  d = jax.tree.map(lambda x, m: jnp.where(count == 0, x, (1 - THETA) * m + THETA * x), g, d)
  scale = RHO / (optax.tree.norm(d) + VASSO_EPS)
  return jax.tree.map(lambda x: scale * x, d), (count + 1, d)


def _gcsam_ascent(g, params, state):
  """e = rho gc(g) / (||g|| + eps), gc removing each kernel's mean over all axes but the last."""
  del params
  scale = RHO / (optax.tree.norm(g) + EPS)
  centred = jax.tree.map(
    lambda x: x - jnp.mean(x, axis=tuple(range(x.ndim - 1)), keepdims=True) if x.ndim > 1 else x,
    g,
  )
  return jax.tree.map(lambda x: scale * x, centred), state


def _unified_ascent(g, params, state):
  del params
  return _normalized(g, UNIFIED_RHO), state


def _clean(g, g_adv):
  del g_adv
  return g


def _wsam_outside(g, g_adv):
  return jax.tree.map(lambda a, x: -LEARNING_RATE * WSAM_WEIGHT * (a - x), g_adv, g)


def _mrwp_init(params):
  del params
  return jax.random.key_data(jax.random.key(0))  # mrwp's seed=0


def _filter_norms(w):
  """The norm of each output filter (the last axis) of a kernel; a vector's whole norm + 1e-16."""
  if w.ndim <= 1:
    return jnp.linalg.norm(w) + 1e-16
  return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(w.ndim - 1)), keepdims=True))


def _mrwp_ascent(g, params, key_data, fisher=None):
  """e ~ N(0, (sigma ||W_i||)^2) per filter, whatever g: one fresh draw per step, a key per leaf.

  With m-ARWP's ``fisher`` F, each filter's noise is divided by sqrt(1 + eta sum_filter F)
  (a vector: each entry's own F).
  """
  del g
  key, draw = jax.random.split(jax.random.wrap_key_data(key_data))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(draw, len(leaves))
  noise = [
    jax.random.normal(k, w.shape) * _filter_norms(w) * MRWP_SIGMA
    for k, w in zip(keys, leaves, strict=True)
  ]
  if fisher is not None:
    noise = [
      e
      / jnp.sqrt(
        1
        + MARWP_ETA
        * (f if f.ndim <= 1 else jnp.sum(f, axis=tuple(range(f.ndim - 1)), keepdims=True))
      )
      for e, f in zip(noise, jax.tree.leaves(fisher), strict=True)
    ]
  return jax.tree.unflatten(treedef, noise), jax.random.key_data(key)


def _marwp_init(params):
  return _mrwp_init(params), jax.tree.map(jnp.zeros_like, params)


def _marwp_ascent(g, params, state):
  key_data, fisher = state
  e, key_data = _mrwp_ascent(g, params, key_data, fisher)
  return e, (key_data, fisher)


def _marwp_observe(state, g_adv):
  """F = beta F + g_adv^2, entry by entry."""
  key_data, fisher = state
  return key_data, jax.tree.map(lambda f, x: MARWP_BETA * f + x * x, fisher, g_adv)


def _mix(g, g_adv):
  """(1 - lmbda) g + lmbda g_adv, written g + lmbda (g_adv - g)."""
  return jax.tree.map(lambda a, x: a + MRWP_LMBDA * (x - a), g, g_adv)


_no_state = lambda params: ()

MATH = {
  'usam': Math(_usam_ascent, _identity, _no_state),
  'asam': Math(_asam_ascent, _identity, _no_state),
  'fsam': Math(_fsam_ascent, _identity, _fsam_init),
  'stablesam': Math(_usam_ascent, _stable, _no_state),
  'gsam': Math(_sam_ascent, _gsam, _no_state),
  'fsam+stable': Math(_fsam_ascent, _stable, _fsam_init),
  'wsam': Math(_sam_ascent, _clean, _no_state, _wsam_outside),
  'vasso': Math(_vasso_ascent, _identity, _fsam_init),
  'gcsam': Math(_gcsam_ascent, _identity, _no_state),
  'unifiedsam': Math(_unified_ascent, _identity, _no_state),
  'mrwp': Math(_mrwp_ascent, _mix, _mrwp_init),
  'marwp': Math(_marwp_ascent, _mix, _marwp_init, observe=_marwp_observe),
}


def reference_step(model: Model, base: optax.GradientTransformation, math: Math):
  """``(init, step)`` of a one-call train step with ``math``; the state is ``(ascent, base)``."""
  value_and_grad = jax.value_and_grad(model.loss, has_aux=True)

  def init(params):
    return math.init(params), base.init(params)

  def step(params, opt_state, model_state, batch):
    ascent_state, base_state = opt_state
    (loss, new_model_state), grads = value_and_grad(params, model_state, batch)
    e, ascent_state = math.ascent(grads, params, ascent_state)
    perturbed = jax.tree.map(jnp.add, params, e)
    adv_grads = jax.grad(model.loss, has_aux=True)(perturbed, model_state, batch)[0]
    if math.observe is not None:
      ascent_state = math.observe(ascent_state, adv_grads)
    updates, base_state = base.update(math.correction(grads, adv_grads), base_state, params)
    if math.outside is not None:
      updates = jax.tree.map(jnp.add, updates, math.outside(grads, adv_grads))
    return (
      optax.apply_updates(params, updates),
      (ascent_state, base_state),
      new_model_state,
      loss,
    )

  return init, step


def sampa_step(model: Model, base: optax.GradientTransformation):
  """``(init, step)`` of SAMPa written out: two gradients side by side (one vmap), one update.

  The state is ``(count, d, base_state)``; the clean loss is computed for the report (a forward
  pass, as in every case), its gradient is not.
  """
  grad_only = lambda p, model_state, batch: jax.grad(model.loss, has_aux=True)(
    p, model_state, batch
  )[0]

  def init(params):
    return jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), base.init(params)

  def step(params, opt_state, model_state, batch):
    count, d, base_state = opt_state
    loss, new_model_state = model.loss(params, model_state, batch)
    scale = SAMPA_RHO / (optax.tree.norm(d) + EPS)
    perturbed = jax.tree.map(lambda w, v: w + scale * v, params, d)
    tentative, _ = base.update(d, base_state, params)
    first = (count > 0).astype(jnp.float32)
    auxiliary = jax.tree.map(lambda w, u: w + first * u, params, tentative)
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), perturbed, auxiliary)
    grads = jax.vmap(lambda p: grad_only(p, model_state, batch))(pair)
    mixed = jax.tree.map(lambda g: (1 - SAMPA_LMBDA) * g[0] + SAMPA_LMBDA * g[1], grads)
    updates, base_state = base.update(mixed, base_state, params)
    d = jax.tree.map(lambda g: g[1], grads)
    return (
      optax.apply_updates(params, updates),
      (count + 1, d, base_state),
      new_model_state,
      loss,
    )

  return init, step


# The variants whose step is not an ascent and a correction: their own hand-written step.
def lookbehind_step(model: Model, base: optax.GradientTransformation):
  """``(init, step)`` of Lookbehind-SAM written out: ``k`` ascents and descents, then interpolate.

  From the slow weights ``s``: ``a = phi = s``; ``k`` times ``a += rho g / (||g|| + 1e-16)`` with
  ``g`` the last gradient (the clean one first), ``g = grad(a)``, ``phi = phi + base(g, phi)``; then
  ``s' = alpha phi + (1 - alpha) s``. The state is the base optimizer's.
  """
  value_and_grad = jax.value_and_grad(model.loss, has_aux=True)

  def step(params, base_state, model_state, batch):
    (loss, new_model_state), g = value_and_grad(params, model_state, batch)
    ascended, fast = params, params
    for _ in range(LOOKBEHIND_K):
      scale = RHO / (optax.tree.norm(g) + LOOKBEHIND_EPS)
      ascended = jax.tree.map(lambda a, x, c=scale: a + c * x, ascended, g)
      g = jax.grad(model.loss, has_aux=True)(ascended, model_state, batch)[0]
      updates, base_state = base.update(g, base_state, fast)
      fast = optax.apply_updates(fast, updates)
    slow = jax.tree.map(
      lambda s, f: LOOKBEHIND_ALPHA * f + (1 - LOOKBEHIND_ALPHA) * s, params, fast
    )
    return slow, base_state, new_model_state, loss

  return base.init, step


def bsam_step(model: Model, base: optax.GradientTransformation):
  """``(init, step)`` of bSAM written out (the base optimizer is unused: bSAM is its own).

  The state is ``(count, key, m, s, N)``. The noise: key 0 of ``split(key, 2)``, one key per leaf
  (the authors' ``normal_like_tree``); the clean loss is computed for the report, its gradient at
  the mean is not (the clean gradient is taken at the sample).
  """
  del base
  grad_only = lambda p, model_state, batch: jax.grad(model.loss, has_aux=True)(
    p, model_state, batch
  )[0]
  delta = BSAM_PRIOR / BSAM_DATA_SIZE

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    s = jax.tree.map(lambda w: jnp.full_like(w, BSAM_S0), params)
    n = jnp.asarray(BSAM_DATA_SIZE, jnp.float32)
    return jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(0)), zeros, s, n

  def step(params, opt_state, model_state, batch):
    count, key, m, s, n = opt_state
    loss, new_model_state = model.loss(params, model_state, batch)
    draw, key = jax.random.split(jax.random.wrap_key_data(key))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(draw, len(leaves) + 1)[1:]
    noise = treedef.unflatten(
      [jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys, leaves, strict=True)]
    )
    sampled = jax.tree.map(lambda w, v, z: w + jnp.sqrt(1.0 / (n * v)) * z, params, s, noise)
    g = grad_only(sampled, model_state, batch)
    perturbed = jax.tree.map(lambda w, x, v: w + BSAM_RHO * x / v, params, g, s)
    g_adv = grad_only(perturbed, model_state, batch)
    m = jax.tree.map(
      lambda a, x, w: BSAM_BETA1 * a + (1 - BSAM_BETA1) * (x + delta * w), m, g_adv, params
    )
    new = jax.tree.map(lambda w, a, v: w - LEARNING_RATE * a / v, params, m, s)
    s = jax.tree.map(
      lambda v, x: BSAM_BETA2 * v + (1 - BSAM_BETA2) * (jnp.sqrt(v * x**2) + BSAM_DAMPING + delta),
      s,
      g,
    )
    return new, (count + 1, jax.random.key_data(key), m, s, n), new_model_state, loss

  return init, step


STEPS = {'sampa': sampa_step, 'lookbehind': lookbehind_step, 'bsam': bsam_step}
