"""The Equinox recipe of docs/equinox.md: it runs, and its SAM step is SAM's formula."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam

eqx = pytest.importorskip('equinox')

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'equinox.md'


def _run(blocks):
  """A namespace after the first ``blocks`` Python blocks of the page ran (they assert results)."""
  code = re.findall(r'```python\n(.*?)```', DOC.read_text(), flags=re.S)
  assert len(code) == 2
  namespace = {'__name__': 'docs_equinox_md'}
  for block in code[:blocks]:
    exec(compile(block, str(DOC), 'exec'), namespace)
  return namespace


def test_the_page_trains_and_the_two_phase_pair_ends_clean():
  page = _run(2)
  assert page['losses'][-1] < 0.1 * page['losses'][0]
  assert not bool(optax_sam.is_perturbed(page['opt_state']))
  # the two-phase pair moved the weights, and clean_params saw w (not w + e) between the calls
  assert _max_diff(_arrays(page['clean']), _arrays(page['model'])) > 0


def _arrays(model):
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def _max_diff(a, b):
  return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b, strict=True))


def test_one_call_step_is_sam_written_with_plain_jax_on_the_arrays():
  """Three steps of the page's train_step (sam(adam(1e-2), rho=0.05)) on a fresh model."""
  page = _run(1)
  model = eqx.nn.MLP(in_size=3, out_size=1, width_size=16, depth=2, key=jax.random.key(3))
  x, y, rho = page['x'], page['y'], 0.05
  params, static = eqx.partition(model, eqx.is_inexact_array)
  leaves, treedef = jax.tree.flatten(params)
  loss = lambda ls: page['loss_fn'](eqx.combine(jax.tree.unflatten(treedef, ls), static), x, y)

  def plain_jax(leaves, rho, steps=3):
    adam = optax.adam(1e-2)
    state = adam.init(leaves)
    for _ in range(steps):
      g = jax.grad(loss)(leaves)
      norm = jnp.sqrt(sum(jnp.sum(gi**2) for gi in g))
      g_adv = jax.grad(loss)(
        [w + rho * gi / (norm + 1e-12) for w, gi in zip(leaves, g, strict=True)]
      )
      updates, state = adam.update(g_adv, state, leaves)
      leaves = [w + u for w, u in zip(leaves, updates, strict=True)]
    return [np.asarray(w, np.float64) for w in leaves]

  opt_state = page['tx'].init(eqx.filter(model, eqx.is_inexact_array))
  for _ in range(3):
    model, opt_state, _ = page['train_step'](model, opt_state, x, y)
  got, want = _arrays(model), plain_jax(leaves, rho)
  assert len(got) == 6  # three Linear layers: weight and bias each
  assert _max_diff(got, want) < 1e-6
  assert _max_diff(plain_jax(leaves, 0.0), want) > 1e-3  # SAM, not Adam: rho matters here
