"""How much of SAM's perturbation survives low-precision weights, before and after the float32 pass.

Run from the repository root::

  python -m benchmarks.mixed_precision            # MLPs of 19k, 535k and 4.2M parameters
  python -m benchmarks.mixed_precision --quick    # one small MLP, a few rounds (CI)

For each MLP (tanh hidden layer, softmax cross-entropy, batch 128, ``rho =
0.05``) and each setting it reports, from one SAM step:

* ``moved``: the share of coordinates the perturbed pass saw move
  (``SAMStatistics.moved_fraction``);
* ``cos``: the cosine between the perturbation the pass saw and the one
  computed (``SAMStatistics.effective_cosine``);
* ``error``: ``||g_adv - g_adv32|| / ||g_adv32 - g32||``, the perturbed
  gradient's distance from float32 SAM's, as a share of SAM's correction
  ``g_adv - g`` in float32 (all in float32 arithmetic, at the same weights);
* ``clean error``: the same for the clean gradient, ``||g - g32||`` over the
  same correction: the part of ``error`` that the compute dtype makes anyway,
  which no perturbation can remove.

Settings: bfloat16 weights with ``perturb_in_param_dtype=True`` (``w + e``
rounded to bfloat16: the library before), bfloat16 weights by default
(float32 ``w + e``; the model computes in the dtype of the weights it gets),
and float32 master weights with a bfloat16 compute dtype (the model casts
its weights to bfloat16 inside). Then the one-call step time with bfloat16
weights (default) against float32 weights, and against
``perturb_in_param_dtype=True``, measured side by side in interleaved rounds
(medians of per-round ratios).
"""

import argparse
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam

RHO = 0.05
SIZES = {'19k': (64, 256), '535k': (512, 1024), '4.2M': (1024, 4096)}
QUICK_SIZES = {'19k': (64, 256)}


def mlp(inputs: int, width: int, compute_dtype=None, seed: int = 0):
  """Float32 params of a one-hidden-layer MLP and its loss on a fixed batch of 128."""
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    'w1': jax.random.normal(k[0], (inputs, width)) / np.sqrt(inputs),
    'b1': jnp.zeros((width,)),
    'w2': jax.random.normal(k[1], (width, 10)) / np.sqrt(width),
  }
  x = jax.random.normal(k[2], (128, inputs))
  y = jax.random.randint(k[3], (128,), 0, 10)

  def loss(p):
    dt = p['w1'].dtype if compute_dtype is None else compute_dtype
    p = jax.tree.map(lambda v: v.astype(dt), p)
    h = jnp.tanh(x.astype(dt) @ p['w1'] + p['b1'])
    logits = (h @ p['w2']).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def _cast(tree, dtype):
  return jax.tree.map(lambda v: v.astype(dtype), tree)


def _one_step(tx, params, grad_fn):
  """``(weights grad_fn saw, statistics)`` of one jitted one-call step."""

  @jax.jit
  def step(params):
    seen = []

    def recording(p):
      seen.append(p)
      return grad_fn(p)

    _, state = tx.update(grad_fn(params), tx.init(params), params, grad_fn=recording)
    return seen[0], optax_sam.step_statistics(state)

  return step(params)


def rounding_row(inputs: int, width: int, setting: str) -> dict:
  """The three measures of one setting on one MLP."""
  params32, loss32 = mlp(inputs, width)
  if setting == 'f32 master, bf16 compute':
    params, loss = params32, mlp(inputs, width, compute_dtype=jnp.bfloat16)[1]
  else:
    params, loss = _cast(params32, jnp.bfloat16), loss32
  keep = setting == 'bf16 weights, before'
  tx = optax_sam.sam(optax.sgd(0.1), rho=RHO, statistics=True, perturb_in_param_dtype=keep)
  grad_fn = jax.jit(jax.grad(loss))
  seen, stats = _one_step(tx, params, grad_fn)
  g_adv = _cast(grad_fn(seen), jnp.float32)
  # Float32 SAM at the same weights, computing in float32.
  w32 = _cast(params, jnp.float32)
  grad32 = jax.jit(jax.grad(loss32))
  g32 = grad32(w32)
  e32 = optax.tree.scale(RHO / optax.tree.norm(g32), g32)
  g_adv32 = grad32(optax.tree.add(w32, e32))
  correction = optax.tree.norm(optax.tree.sub(g_adv32, g32))
  error = optax.tree.norm(optax.tree.sub(g_adv, g_adv32)) / correction
  clean = _cast(grad_fn(params), jnp.float32)
  clean_error = optax.tree.norm(optax.tree.sub(clean, g32)) / correction
  size = sum(v.size for v in jax.tree.leaves(params32))
  return {
    'params': size,
    'setting': setting,
    'moved': float(stats.moved_fraction),
    'cos': float(stats.effective_cosine),
    'error': float(error),
    'clean error': float(clean_error),
  }


def step_time_ratios(inputs: int, width: int, rounds: int, steps: int) -> dict:
  """Median per-round ratios of one-call step times, timed side by side."""
  params32, loss = mlp(inputs, width)
  params16 = _cast(params32, jnp.bfloat16)
  grad_fn = jax.grad(loss)

  def compiled(params, keep):
    tx = optax_sam.sam(optax.sgd(0.1), rho=RHO, perturb_in_param_dtype=keep)

    def step(p, s):
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s

    run = jax.jit(step, donate_argnums=(0, 1))
    return run, (lambda: (jax.tree.map(jnp.copy, params), tx.init(params)))

  cases = {
    'f32': compiled(params32, False),
    'bf16': compiled(params16, False),
    'bf16 before': compiled(params16, True),
  }
  carry = {name: make() for name, (_, make) in cases.items()}
  for name, (run, _) in cases.items():  # compile and warm up
    carry[name] = jax.block_until_ready(run(*carry[name]))
  times = {name: [] for name in cases}
  order = list(cases)
  for r in range(rounds):
    for name in order if r % 2 == 0 else reversed(order):
      run = cases[name][0]
      start = time.perf_counter()
      for _ in range(steps):
        carry[name] = run(*carry[name])
      jax.block_until_ready(carry[name])
      times[name].append((time.perf_counter() - start) / steps)
    order = order[1:] + order[:1]
  t = {name: np.asarray(v) for name, v in times.items()}
  return {
    'bf16 / f32': float(np.median(t['bf16'] / t['f32'])),
    'bf16 / bf16 before': float(np.median(t['bf16'] / t['bf16 before'])),
    'f32 ms': float(np.median(t['f32']) * 1e3),
  }


SETTINGS = ('bf16 weights, before', 'bf16 weights, after', 'f32 master, bf16 compute')


def markdown(rows: list, timing: dict) -> str:
  lines = [
    '| parameters | setting | coordinates moved | cosine(effective e, e) | perturbed-gradient '
    'error / SAM correction | clean-gradient error / SAM correction |',
    '|---:|---|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["params"]:,} | {r["setting"]} | {r["moved"]:.1%} | {r["cos"]:.4f} '
      f'| {r["error"]:.2%} | {r["clean error"]:.2%} |'
    )
  lines += [
    '',
    '| parameters | bf16 step / f32 step | bf16 step / bf16 before | f32 step (ms) |',
    '|---:|---:|---:|---:|',
  ]
  for size, t in timing.items():
    lines.append(
      f'| {size} | {t["bf16 / f32"]:.3f} | {t["bf16 / bf16 before"]:.3f} | {t["f32 ms"]:.2f} |'
    )
  return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='one small MLP, few rounds')
  parser.add_argument('--out', type=pathlib.Path, help='folder for mixed_precision.json/.md')
  args = parser.parse_args(argv)
  sizes = QUICK_SIZES if args.quick else SIZES
  rounds, steps = (3, 2) if args.quick else (15, 5)
  rows, timing = [], {}
  for label, (inputs, width) in sizes.items():
    for setting in SETTINGS:
      rows.append(rounding_row(inputs, width, setting))
      print(json.dumps(rows[-1]), flush=True)
    timing[label] = step_time_ratios(inputs, width, rounds, steps)
    print(json.dumps({label: timing[label]}), flush=True)
  text = markdown(rows, timing)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'mixed_precision.json').write_text(json.dumps({'rows': rows, 'timing': timing}))
    (args.out / 'mixed_precision.md').write_text(text)
  print(text)
  return text


if __name__ == '__main__':
  main()
