"""The README's Python snippets run, and its training step really trains."""

import pathlib
import re

import optax

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks(path):
  return re.findall(r'```python\n(.*?)```', path.read_text(), flags=re.S)


def test_readme_snippets_run_as_pasted_and_train():
  """Each block runs in order in one fresh namespace, as a reader pastes them."""
  blocks = python_blocks(README)
  assert len(blocks) >= 2
  namespace = {}
  exec(compile(blocks[0], str(README), 'exec'), namespace)
  losses = namespace['losses']
  assert losses[-1] < 0.05 * losses[0]
  for block in blocks[1:]:
    exec(compile(block, str(README), 'exec'), namespace)
  assert isinstance(namespace['tx'], optax.GradientTransformation)
