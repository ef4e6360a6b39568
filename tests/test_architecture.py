"""The core's shape: short functions, one state search, options validated once, held weights."""

import ast
import dataclasses
import inspect
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_sam
from optax_sam._src import aliases
from optax_sam._src import options as options_lib
from optax_sam._src import state as state_lib
from tests import helpers

PACKAGE = pathlib.Path(optax_sam.__file__).parent


def _body_lengths():
  """``(file, function, lines of its body without the docstring)`` for every function."""
  for path in sorted(PACKAGE.rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        body = node.body
        docstring = isinstance(body[0], ast.Expr) and isinstance(
          getattr(body[0], 'value', None), ast.Constant
        )
        first = body[1] if docstring and len(body) > 1 else body[0]
        yield path.relative_to(PACKAGE), node.name, node.end_lineno - first.lineno + 1


def test_no_function_body_in_the_package_is_over_100_lines():
  long = [(str(f), name, n) for f, name, n in _body_lengths() if n > 100]
  assert not long, long


def _code_lines(source: str) -> list[tuple[int, str]]:
  """``(line number, stripped line)`` of a module's code lines.

  Left out: signatures and docstrings (parallel public functions share them on purpose),
  imports, and blank, comment and bracket-only lines.
  """
  tree = ast.parse(source)
  skip = set(range(1, tree.body[0].end_lineno + 1)) if ast.get_docstring(tree) else set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      skip.update(range(node.lineno, node.end_lineno + 1))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      end = node.body[0].end_lineno if ast.get_docstring(node) else node.body[0].lineno - 1
      start = min([d.lineno for d in node.decorator_list], default=node.lineno)
      skip.update(range(start, end + 1))  # a decorator may span several lines
  lines = [(i, t.strip()) for i, t in enumerate(source.splitlines(), start=1) if i not in skip]
  return [(i, t) for i, t in lines if t.strip('()[]{},:') and not t.startswith('#')]


def _repeated_code(sources: dict[str, str], size: int = 6) -> list[tuple[str, str]]:
  """``(first place, second place)`` of each run of ``size`` code lines that stands twice."""
  seen, repeats = {}, []
  for name, source in sources.items():
    code = _code_lines(source)
    for k in range(len(code) - size + 1):
      run = tuple(line for _, line in code[k : k + size])
      first_name, first_k, first_line = seen.setdefault(run, (name, k, code[k][0]))
      if first_name != name or k - first_k >= size:
        repeats.append((f'{first_name}:{first_line}', f'{name}:{code[k][0]}'))
  return repeats


def test_no_six_lines_of_code_stand_twice_in_the_package():
  """A new part calls a helper instead of copying one.

  Exact lines only, unlike the ``duplicates`` tool's shapes: the aliases before this test
  forwarded the same eight hyperparameters one per line in four places and fail it.
  """
  sources = {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob('*.py'))}
  assert not _repeated_code(sources)
  copied = 'def f(x):\n  """Doc."""\n' + ''.join(f'  y{i} = g(x, {i})\n' for i in range(7))
  decorated = '@functools.partial(\n  jax.jit,\n  static_argnums=0,\n)\ndef f(x):\n  return x\n'
  assert _code_lines(decorated) == [(6, 'return x')]
  same = 'def f(x):\n' + '  x = g(x)\n' * 7
  assert _repeated_code({'a.py': same}) == []  # windows of one run overlap
  assert _repeated_code({'a.py': same + '  x = g(x)\n' * 5})[0] == ('a.py:2', 'a.py:8')
  twice = {'a.py': copied, 'b.py': copied.replace('def f', 'def h')}
  assert _repeated_code(twice) == [('a.py:3', 'b.py:3'), ('a.py:4', 'b.py:4')]


def test_the_source_has_two_rooms():
  rooms = {p.name for p in (PACKAGE / '_src').iterdir() if p.is_dir() and p.name != '__pycache__'}
  assert rooms == {'diagnostics'}
  for name in ('hvp', 'lanczos', 'trace_estimators', 'hessian_spectrum', 'sam_sharpness'):
    assert (PACKAGE / '_src' / 'diagnostics' / f'{name}.py').exists()
    assert not (PACKAGE / '_src' / f'{name}.py').exists()


# ------------------------------------------------------------------------------ find_states


def test_find_states_finds_by_type_with_paths_and_does_not_descend():
  params = jnp.zeros(3)
  tx = optax.chain(
    optax.add_decayed_weights(1e-4),
    optax_sam.sam(optax.sgd(0.1, momentum=0.9), two_phase=True),
  )
  state = (optax.EmptyState(), tx.init(params))
  found = state_lib.find_states(state, state_lib.TwoPhaseSAMState)
  assert len(found) == 1
  path, node = found[0]
  assert isinstance(node, state_lib.TwoPhaseSAMState)
  assert jax.tree_util.keystr(path) == '[1][1]'
  # The trace inside the found node is not reported when looking for SAM states...
  assert len(state_lib.find_states(state, (state_lib.TwoPhaseSAMState, optax.TraceState))) == 1
  # ...but is when it is what is looked for.
  assert len(state_lib.find_states(state, optax.TraceState)) == 1
  assert state_lib.find_states(state, optax.ScaleByAdamState) == []


def test_find_one_refuses_several():
  tx = optax.chain(
    optax_sam.sam(optax.sgd(0.1), two_phase=True), optax_sam.sam(optax.sgd(0.1), two_phase=True)
  )
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match='found 2'):
    optax_sam.clean_params(jnp.zeros(2), state)


# ------------------------------------------------------------------- clean_params, is_perturbed


def _held_weights_after_one_step(tx, two_phase_calls):
  params, _, grad_fn = helpers.problem()
  state = tx.init(params)
  for _ in range(two_phase_calls):
    updates, state = tx.update(
      grad_fn(params), state, params, **helpers.grad_fn_for(state, grad_fn)
    )
    params = optax.apply_updates(params, updates)
  return params, state


OPTIMIZERS = {
  'sam one-call': (lambda: optax_sam.sam(optax.sgd(0.1), rho=0.1), 1, False),
  'sam two-phase, between': (
    lambda: optax_sam.sam(optax.sgd(0.1), rho=0.1, two_phase=True),
    1,
    True,
  ),
  'sam two-phase, after': (
    lambda: optax_sam.sam(optax.sgd(0.1), rho=0.1, two_phase=True),
    2,
    False,
  ),
  'momentum_sam': (lambda: optax_sam.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.3), 1, True),
  'momentum_sam rho=0': (
    lambda: optax_sam.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.0),
    1,
    False,
  ),
  'look_sam': (lambda: optax_sam.look_sam(optax.sgd(0.1), k=2), 1, False),
}


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_clean_params_and_is_perturbed_agree_for_every_optimizer(name):
  make, calls, perturbed = OPTIMIZERS[name]
  held, state = _held_weights_after_one_step(make(), calls)
  wrapped = (optax.EmptyState(), state)  # inside another state, as in a chain
  assert bool(optax_sam.is_perturbed(wrapped)) is perturbed
  differs = helpers.max_diff(optax_sam.clean_params(held, wrapped), held) > 0
  assert differs is perturbed


def test_momentum_sam_is_perturbed_from_its_first_step():
  """The held weights are w - rho v / ||v||: is_perturbed says so, as clean_params handles it."""
  tx = optax_sam.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.3)
  params, _, grad_fn = helpers.problem()
  state = tx.init(params)
  assert not bool(optax_sam.is_perturbed(state))
  updates, state = tx.update(grad_fn(params), state, params)
  assert bool(jax.jit(optax_sam.is_perturbed)(state))


# -------------------------------------------------------------------------------- the options


def test_the_options_are_validated_once_for_every_alias():
  with pytest.raises(
    TypeError, match=r'when must be a Policy.*every.*after.*randomly.*ae_sam.*got 5'
  ):
    optax_sam.sam(optax.sgd(0.1), when=5)
  with pytest.raises(TypeError, match='two_phase must be True or False'):
    optax_sam.friendly_sam(optax.sgd(0.1), two_phase='yes')
  with pytest.raises(ValueError, match='local_perturbation=True needs axis_name'):
    optax_sam.gsam(optax.sgd(0.1), local_perturbation=True)
  with pytest.raises(TypeError, match=r'base_optimizer must be an Optax transformation.*got 0.1'):
    optax_sam.sam(0.1)


def test_options_are_frozen_and_every_factory_spells_them_out():
  options = options_lib.SAMOptions(axis_name='i', statistics=True, when=optax_sam.every(2))
  assert options.axis_name == 'i' and options.statistics and not options.two_phase
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.two_phase = True
  names = [f.name for f in dataclasses.fields(options_lib.SAMOptions)]
  for factory in (optax_sam.sharpness_aware, *aliases.VARIANTS.values()):
    factory = getattr(factory, 'func', factory)
    if factory is optax_sam.momentum_sam:
      continue  # no wrapper: it perturbs against the momentum, with the caller's one gradient
    parameters = inspect.signature(factory).parameters
    assert list(parameters)[-len(names) :] == names, factory.__name__
    assert all(parameters[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names)
    assert inspect.Parameter.VAR_KEYWORD not in {p.kind for p in parameters.values()}
  with pytest.raises(TypeError, match="unexpected keyword argument 'two_phases'"):
    optax_sam.wsam(optax.sgd(0.1), two_phases=True)
  with pytest.raises(TypeError, match="multiple values for argument 'rho'"):
    optax_sam.vasso(optax.sgd(0.1), 0.1, rho=0.2)


# ------------------------------------------------------------------------------- the variants


def test_every_named_variant_is_in_the_tests_table():
  assert set(aliases.VARIANTS) <= set(helpers.VARIANTS)
  for name, factory in aliases.VARIANTS.items():
    alias = getattr(factory, 'func', factory)
    assert helpers.VARIANTS[name].alias is alias, name


def test_the_example_and_the_benchmarks_know_every_named_variant():
  from benchmarks import cases, cheap  # noqa: PLC0415 - the benchmarks are not the library
  from optax_sam.examples import config  # noqa: PLC0415 - needs the examples extra

  assert set(aliases.VARIANTS) <= set(config.SINGLE_OPTIMIZERS)
  benchmarked = {v.name for v in cases.VARIANTS} | set(cheap.VARIANT_CASES)
  assert set(aliases.VARIANTS) <= benchmarked, set(aliases.VARIANTS) - benchmarked


def test_the_aliases_are_compositions():
  """No alias calls another alias or the public wrapper: each composes parts with compose()."""
  source = pathlib.Path(aliases.__file__).read_text()
  factories = {'sam', 'asam', 'friendly_sam', 'stable_sam', 'gsam', 'look_sam', 'sharpness_aware'}
  called = {
    node.func.id
    for node in ast.walk(ast.parse(source))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
  }
  assert not called & factories
  assert '{distributed}' not in source and '__doc__' not in source


def test_the_aliases_hand_hyperparameters_on_by_keyword():
  """Inside an alias, its hyperparameters reach the parts by keyword (the radius may lead).

  A positional pass-through (``_build(9 positional)``) breaks silently when a part gains or
  reorders a parameter; by keyword, it is a ``TypeError``. Only the first two arguments of a
  call (``ascent(rho, ...)``, ``check_range('rho', rho)``) may be a hyperparameter by position.
  """
  tree = ast.parse(pathlib.Path(aliases.__file__).read_text())
  alias_nodes = [
    node
    for node in tree.body
    if isinstance(node, ast.FunctionDef)
    and 'options_lib.takes_options' in map(ast.unparse, node.decorator_list)
  ]
  assert len(alias_nodes) >= 15, [node.name for node in alias_nodes]
  positional = []
  for alias in alias_nodes:
    hyperparameters = {a.arg for a in alias.args.args + alias.args.kwonlyargs} - {'base_optimizer'}
    for node in ast.walk(alias):
      if isinstance(node, ast.Call):
        passed = [a.id for a in node.args[2:] if isinstance(a, ast.Name)]
        positional += [
          (alias.name, ast.unparse(node.func), n) for n in passed if n in hyperparameters
        ]
  assert not positional, positional
