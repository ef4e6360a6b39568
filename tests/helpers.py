"""A small regression problem shared by the tests; the environment of the processes they start."""

import os

import jax
import jax.numpy as jnp
import numpy as np


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

  It keeps conftest's compile flags and compilation cache, without conftest's 8 fake devices.
  """
  env = dict(os.environ)
  flags = env.get('XLA_FLAGS', '').split()
  env['XLA_FLAGS'] = ' '.join(f for f in flags if 'xla_force_host_platform_device_count' not in f)
  return env
