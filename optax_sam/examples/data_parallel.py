r"""Data-parallel SAM: ``jax.jit`` with sharded arrays, and ``jax.shard_map``.

A small MLP learns a random teacher network's labels, with the batch split
over every device. Two ways to run the same SAM step:

* ``jit``: the batch is a ``NamedSharding``-sharded array and the params are
  replicated. Nothing SAM-specific: gradients are global, so the perturbation
  is global, and the result equals single-device SAM on the whole batch.
* ``shard_map``: the step runs per device, so the optimizer gets
  ``axis_name='data'`` and each device's local gradient. With
  ``local_perturbation=True`` each device perturbs with its own gradient
  (m-sharpness, m = the per-device batch).

Run it on 8 fake CPU devices::

  python optax_sam/examples/data_parallel.py --fake-devices 8 --steps 100

See docs/distributed.md for the recipe and how to choose the perturbation.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sam

AXIS = 'data'


def make_data(key, num_examples, dim=8, classes=4):
  """Inputs and the labels a random tanh teacher network gives them."""
  kx, k1, k2 = jax.random.split(key, 3)
  x = jax.random.normal(kx, (num_examples, dim))
  hidden = jnp.tanh(x @ jax.random.normal(k1, (dim, 32)))
  labels = jnp.argmax(hidden @ jax.random.normal(k2, (32, classes)), axis=-1)
  return x, labels


def init_params(key, dim=8, hidden=32, classes=4):
  k1, k2 = jax.random.split(key)
  return {
    'dense1': {
      'kernel': jax.random.normal(k1, (dim, hidden)) / jnp.sqrt(dim),
      'bias': jnp.zeros(hidden),
    },
    'dense2': {
      'kernel': jax.random.normal(k2, (hidden, classes)) / jnp.sqrt(hidden),
      'bias': jnp.zeros(classes),
    },
  }


def loss_fn(params, batch):
  """Mean cross-entropy over the batch it is given (the local batch under shard_map)."""
  x, labels = batch
  h = jax.nn.relu(x @ params['dense1']['kernel'] + params['dense1']['bias'])
  logits = h @ params['dense2']['kernel'] + params['dense2']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_optimizer(rho=0.05, learning_rate=0.1, **distributed):
  return optax_sam.sam(optax.sgd(learning_rate, momentum=0.9), rho=rho, **distributed)


# --------------------------------------------------------------- jit with sharded arrays


def jit_train_step(tx):
  """The ordinary SAM step; under jit with a sharded batch its gradients are global."""

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


# ------------------------------------------------------------------------------ shard_map


def shard_map_train_step(tx, mesh, local_perturbation=False):
  """The SAM step per device; ``tx`` must be built with ``axis_name=AXIS``.

  ``jax.grad`` of replicated (invariant) params inside ``shard_map`` returns
  the gradient already summed over devices. Marking the params as varying
  with ``jax.lax.pcast`` gives this device's own gradient, which ``update``
  averages itself. With local perturbation the perturbed weights ``w + e_i``
  already vary across devices, so ``grad_fn`` takes them as they are.
  """

  def varying(tree):  # this device's copy: jax.grad with respect to it is not summed
    return jax.lax.pcast(tree, AXIS, to='varying')

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(varying(params), batch)
    # Global: w + e is the same on every device, so it needs marking like params.
    # Local: w + e_i already varies (and pcast rejects a value that already varies).
    perturbed = (lambda p: p) if local_perturbation else varying
    grad_fn = lambda p: jax.grad(loss_fn)(perturbed(p), batch)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, AXIS)

  return jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS)),  # params and state replicated, the batch split
      out_specs=(P(), P(), P()),  # check_vma verifies they stay replicated
    )
  )


# ----------------------------------------------------------------------------------- main


def train(method, steps=100, batch_size=64, rho=0.05, local_perturbation=False, seed=0):
  """Trains with ``method`` ('jit' or 'shard_map'); returns (params, losses)."""
  devices = jax.device_count()
  if batch_size % devices:
    raise ValueError(f'batch_size {batch_size} is not a multiple of {devices} devices.')
  if method == 'jit' and local_perturbation:
    raise ValueError(
      'local_perturbation needs shard_map (or pmap): under jit gradients are global.'
    )
  mesh = jax.make_mesh((devices,), (AXIS,))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  key_data, key_params = jax.random.split(jax.random.key(seed))
  x, labels = make_data(key_data, batch_size * steps)
  params = jax.device_put(init_params(key_params), replicated)
  if method == 'jit':
    tx = make_optimizer(rho)
    train_step = jit_train_step(tx)
  elif method == 'shard_map':
    tx = make_optimizer(rho, axis_name=AXIS, local_perturbation=local_perturbation)
    train_step = shard_map_train_step(tx, mesh, local_perturbation)
  else:
    raise ValueError(f"method must be 'jit' or 'shard_map', got {method!r}.")
  opt_state = jax.device_put(tx.init(params), replicated)
  losses = []
  for i in range(steps):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    batch = jax.device_put((x[rows], labels[rows]), split)
    params, opt_state, loss = train_step(params, opt_state, batch)
    losses.append(float(loss))
  return params, losses


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--method', choices=('jit', 'shard_map', 'both'), default='both')
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--rho', type=float, default=0.05)
  parser.add_argument('--local-perturbation', action='store_true', help='m-sharpness (shard_map)')
  parser.add_argument(
    '--fake-devices', type=int, default=0, help='simulate this many CPU devices (before JAX starts)'
  )
  args = parser.parse_args(argv)
  if args.fake_devices:
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={args.fake_devices}'
    jax.config.update('jax_platforms', 'cpu')
  methods = ('jit', 'shard_map') if args.method == 'both' else (args.method,)
  results = {}
  for method in methods:
    local = args.local_perturbation and method == 'shard_map'
    _, losses = train(method, args.steps, args.batch_size, args.rho, local)
    results[method] = losses
    print(
      f'{method:9s} on {jax.device_count()} devices'
      f'{" (local perturbation)" if local else ""}: '
      f'loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} steps'
    )
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
