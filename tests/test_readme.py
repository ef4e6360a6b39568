"""The README's Python snippets run, and its training step really trains."""

import pathlib
import re

import jax
import jax.numpy as jnp
import optax

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks(path):
  return re.findall(r'```python\n(.*?)```', path.read_text(), flags=re.S)


def test_readme_snippets_run_and_train():
  blocks = python_blocks(README)
  assert len(blocks) >= 3
  x = jax.random.normal(jax.random.key(0), (32, 4))
  y = x @ jnp.array([1.0, -2.0, 0.5, 3.0])
  namespace = {
    'params': {'w': jnp.zeros(4)},
    'loss_fn': lambda p, batch: jnp.mean((batch[0] @ p['w'] - batch[1]) ** 2),
    'base': optax.sgd(0.05),
  }
  exec(compile(blocks[0], str(README), 'exec'), namespace)
  step, params, opt_state = namespace['train_step'], namespace['params'], namespace['opt_state']
  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state, (x, y))
    losses.append(float(loss))
  assert losses[-1] < 0.05 * losses[0]
  for block in blocks[1:]:
    exec(compile(block, str(README), 'exec'), namespace)
  assert isinstance(namespace['tx'], optax.GradientTransformation)
