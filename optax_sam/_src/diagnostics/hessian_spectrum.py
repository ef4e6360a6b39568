r"""The Hessian's extreme eigenvalues (Lanczos) and its spectral density (SLQ).

Both run the pytree Lanczos process of :mod:`optax_sam._src.diagnostics.lanczos` on the
Hessian-vector products of ``loss_fn`` at ``params`` and never form the
Hessian.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import (
  chunking,
  compiled,
  trace_estimators,
  tree_basis,
  vector_layout,
)
from optax_sam._src.diagnostics import hvp as hvp_lib
from optax_sam._src.diagnostics import lanczos as lanczos_lib

DEFAULT_EIGEN_STEPS = 20  # plus 2 per eigenvalue asked for (num_steps=None: 20 + 2 k)
CONVERGENCE_RTOL = 1e-3  # a residual below this times the largest |Ritz value| counts as converged
DEFAULT_SLQ_STEPS = 32
DEFAULT_SLQ_PROBES = 4


class HessianEigenvalues(NamedTuple):
  """Output of :func:`hessian_eigenvalues`.

  Attributes:
    eigenvalues: ``[k]`` Ritz values, largest first (algebraically, or in
      magnitude with ``which='magnitude'``).
    eigenvectors: the Ritz vectors, like ``params`` with a leading ``k`` axis,
      each of unit global norm.
    residuals: ``[k]`` the residual norms :math:`\\|H y_i - \\theta_i y_i\\|`,
      read off the Lanczos recurrence, :math:`|\\beta_m s_{m,i}|` (no extra
      Hessian-vector product; with full reorthogonalization it equals the
      explicit residual to rounding). By the Bauer-Fike theorem *some*
      eigenvalue of :math:`H` lies within ``residuals[i]`` of
      ``eigenvalues[i]``; whether it is the ``i``-th largest is what
      ``converged`` says.
    converged: ``[k]`` bool. ``converged[i]`` when ``residuals[i]`` is below
      ``1e-3`` times the largest Ritz value's magnitude *and* every Ritz value
      ranked below it is converged too or lies, with its residual, entirely
      below ``eigenvalues[i] - residuals[i]`` (so no value still moving up
      could overtake it). ``False`` means the value may not be the ``i``-th
      eigenvalue yet: close eigenvalues (a cluster) make a Ritz value settle on
      a later one while an earlier one is still unresolved; add ``num_steps``.
      No Krylov method can exclude an eigenvalue its start vector is
      orthogonal to, so a ``True`` is very likely, not certain, and less so
      below the default ``num_steps`` (measured on small MLPs with known
      spectra in docs/sharpness.md: at 25 steps for ``k = 5``, 3 of 150 runs
      trusted a 5th value that had settled on the 6th eigenvalue).
    ratio: :math:`\\theta_1 / \\theta_2` of the two leading Ritz values (even
      when ``k == 1``); a ratio near 1 means a small gap, slow convergence and
      possibly interchanged eigenvectors. ``inf`` when there is no nonzero
      second Ritz value.
    krylov_dim: the number of Lanczos vectors actually built (``num_steps``,
      or the number of parameters when it is smaller).
  """

  eigenvalues: jax.Array
  eigenvectors: Any
  residuals: jax.Array
  ratio: jax.Array
  krylov_dim: jax.Array
  converged: jax.Array


@compiled.compiled('k', 'num_steps', 'which', 'num_chunks', 'unroll', 'layout')
def hessian_eigenvalues(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  *,
  key: jax.Array,
  k: int = 1,
  num_steps: Optional[int] = None,
  which: str = 'largest',
  num_chunks: int = 1,
  unroll: bool = False,
  layout: str = 'auto',
) -> HessianEigenvalues:
  r"""The ``k`` leading eigenvalues and eigenvectors of the loss Hessian, by Lanczos.

  Runs ``num_steps`` Lanczos steps with full reorthogonalization from a random
  start hashed from ``key`` (entries uniform in :math:`[-1, 1)`) on
  :math:`H = \nabla^2_w L(w, B)` and
  returns the leading Ritz pairs :math:`(\theta_i, y_i)` of the tridiagonal
  :math:`T = V^\top H V`:

  .. math::

    T s_i = \theta_i s_i, \qquad y_i = V s_i, \qquad
    r_i = \| H y_i - \theta_i y_i \|.

  Extreme eigenvalues converge first, at a rate set by the gap to the next
  one (Kaniel-Paige, roughly :math:`e^{-4 m \sqrt{\gamma}}` for a relative
  gap :math:`\gamma`, against :math:`(\lambda_2 / \lambda_1)^{2m}` for power
  iteration): on a quadratic whose top eigenvalues are 10 and 9, 20 steps give
  :math:`\lambda_{max}` to float32 precision, where power iteration with
  PyHessian's stopping rule stops at about 0.4% error. With fewer parameters
  than ``num_steps`` the Krylov space is the whole space: the process
  restarts after each invariant subspace, stops
  when no direction is left, and the answers are exact (no spurious or zero
  eigenvalues from the unused steps).

  ``which='largest'`` orders by value (the most positive curvature first, the
  usual "sharpness" :math:`\lambda_{max}`); ``which='magnitude'`` orders by
  :math:`|\theta|` (a large negative eigenvalue, i.e. a saddle, comes first).

  Cost: ``num_steps`` Hessian-vector products (about 2 to 3 gradients each,
  see ``docs/sharpness.md``; the residuals come from the recurrence); memory
  ``num_steps + 1`` parameter copies for the basis. Default: ``20 + 2 k``
  steps (22 for ``k = 1``, 30 for ``k = 5``), the budget that returned the
  true top 5 within the reported residuals in 30 of 30 runs on each of three
  small MLPs with known spectra, where ``20 + k`` missed 8 of 30 on one.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (a mean over examples when
      ``num_chunks > 1``).
    params: the point :math:`w`, any pytree of float arrays.
    batch: the data passed to ``loss_fn``.
    key: PRNG key of the starting vector (and of restarts after breakdown).
    k: number of eigenpairs returned, ``1 <= k <= min(num_steps, #params)``
      (static).
    num_steps: Lanczos steps (static); ``None``: ``20 + 2 k``.
    which: ``'largest'`` (algebraic) or ``'magnitude'``.
    num_chunks: evaluate each product over this many chunks of ``batch``
      (static), so that memory does not grow with the batch.
    unroll: unroll the Lanczos loop (static).
      It changes no result and costs compile time roughly linear in
      ``num_steps``. The products already run with their convolutions in
      XLA:CPU's fast order inside the loop, so on CPU the loop is as fast
      (the example's CNN, 10 steps: 1.10 s looped, 1.07 s unrolled, after
      compiling for 13.5 s and 71 s).
    layout: ``'auto'``, ``'tree'`` or ``'flat'`` (static): how the Krylov
      basis is held, see :func:`eigenvalues`. ``'auto'`` ravels it for
      parameters of one dtype that are whole on each device, up to 2^20 of
      them (the first call compiles about 1.5x faster on a 6-leaf MLP, 2.8x on
      a 50-leaf one), and keeps it leaf by leaf for sharded or larger parameters
      and inside ``jax.jit`` (a raveled basis is held twice).

  Returns:
    A :class:`HessianEigenvalues`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> h = jnp.array([3.0, 1.0, -2.0])
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(h * p['w'] ** 2)
    >>> r = sharpness.hessian_eigenvalues(
    ...     loss_fn, {'w': jnp.ones(3)}, None, key=jax.random.key(0), k=2)
    >>> print(jnp.round(r.eigenvalues, 4), r.krylov_dim)
    [3. 1.] 3

  References:
    Lanczos, 1950 (J. Res. Nat. Bur. Standards 45);
    Ghorbani et al., 2019, "An Investigation into Neural Net Optimization via
    Hessian Eigenvalue Density": https://arxiv.org/abs/1901.10159
  """
  chunking.check_num_chunks(num_chunks)
  hvp = hvp_lib.hvp_fn(loss_fn, params, batch, num_chunks)
  options = dict(key=key, k=k, num_steps=num_steps, which=which, unroll=unroll)
  return eigenvalues(hvp, params, **options, layout=layout)


def eigenvalues(
  matvec: Callable[[Any], Any],
  params: Any,
  *,
  key: jax.Array,
  k: int = 1,
  num_steps: Optional[int] = None,
  which: str = 'largest',
  unroll: bool = False,
  layout: str = 'auto',
) -> HessianEigenvalues:
  r"""The ``k`` leading eigenvalues and eigenvectors of a symmetric operator, by Lanczos.

  :func:`hessian_eigenvalues` for any product ``matvec(v) -> Mv`` on vectors
  like ``params``: :func:`hessian_operator`, :func:`ggn_operator`,
  :func:`fisher_operator` or a user's own (see :func:`hessian_eigenvalues` for
  the method, its convergence and its cost: ``num_steps`` products).

  Args:
    matvec: ``matvec(v) -> Mv`` for ``v`` like ``params`` (symmetric :math:`M`).
    params: a template of the vectors (their structure, shapes and dtypes).
    key: PRNG key of the starting vector (and of restarts after breakdown).
    k: number of eigenpairs returned, ``1 <= k <= min(num_steps, #params)``
      (static).
    num_steps: Lanczos steps (static); ``None``: ``20 + 2 k``.
    which: ``'largest'`` (algebraic) or ``'magnitude'``.
    unroll: unroll the Lanczos loop (static).
    layout: how the vectors (the Krylov basis) are held (static): ``'tree'``
      leaf by leaf like ``params``, ``'flat'`` raveled into one vector
      (``matvec`` still sees vectors like ``params``; compiling no longer grows
      with the number of leaves, but XLA holds the basis twice), or
      ``'auto'``: ``'flat'`` for concrete parameters of one dtype that are whole
      on each device, at most 2^20 of them, ``'tree'`` for traced, sharded or
      larger ones (see ``docs/sharpness.md``). The same results to rounding.

  Returns:
    A :class:`HessianEigenvalues` (of ``matvec``'s operator).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> a = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    >>> r = sharpness.eigenvalues(lambda v: a @ v, jnp.zeros(2), key=jax.random.key(0), k=2)
    >>> print(jnp.round(r.eigenvalues, 4))
    [3. 1.]

  References:
    Lanczos, 1950 (J. Res. Nat. Bur. Standards 45); Golub and Van Loan,
    "Matrix Computations", 4th ed., section 10.1.
  """
  if vector_layout.resolve(layout, params) == 'flat':
    flat_matvec, template, unravel = vector_layout.raveled(matvec, params)
    options = dict(key=key, k=k, num_steps=num_steps, which=which, unroll=unroll)
    result = eigenvalues(flat_matvec, template, **options, layout='tree')
    return result._replace(eigenvectors=jax.vmap(unravel)(result.eigenvectors))
  numerics.check_integer('k', k)
  if num_steps is None:
    num_steps = DEFAULT_EIGEN_STEPS + 2 * k
  numerics.check_integer('num_steps', num_steps)
  if which not in ('largest', 'magnitude'):
    raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}.")
  n = vector_layout.num_params(params)
  if k > min(num_steps, n):
    raise ValueError(
      f'k must be <= min(num_steps, number of parameters) = {min(num_steps, n)}, got {k}.'
    )
  seed = lanczos_lib.seed_of(key)
  v0 = lanczos_lib.hashed_uniform_like(seed, lanczos_lib.START, params)
  run = lanczos_lib.lanczos(matvec, v0, num_steps, seed, unroll=unroll)
  values, vectors, ok = lanczos_lib.tridiagonal_eigh(run.alphas, run.betas, run.valid)
  if which == 'largest':  # eigh's ascending order reversed; invalid pairs are eigh's lowest
    values, vectors, ok = values[::-1], vectors[:, ::-1], ok[::-1]
    score = values
  else:
    score = jnp.abs(values)
    order = jnp.argsort(jnp.where(ok, -score, jnp.inf))
    values, vectors, ok, score = values[order], vectors[:, order], ok[order], score[order]
  # The basis rows are orthonormal where valid and zero elsewhere, and an ok eigenvector s of T
  # lives on the valid rows (the invalid ones are decoupled), so the Ritz vector V^T s has the
  # norm of s, 1.
  eigvecs = tree_basis.combine(run.basis, jnp.pad(vectors[:, :k].T, ((0, 0), (0, 1))))
  # Residuals from the recurrence: |beta_m s_{m,i}|, for every Ritz value (the convergence flag
  # looks at those ranked below the k returned ones too).
  all_residuals = jnp.abs(run.last_beta * vectors[num_steps - 1, :])
  residuals = all_residuals[:k]
  converged = _converged(score, all_residuals, ok, k)
  second_ok = ok[1] if num_steps > 1 else jnp.zeros([], bool)
  second = values[1] if num_steps > 1 else jnp.zeros([], values.dtype)
  has_second = second_ok & (second != 0)
  ratio = jnp.where(has_second, values[0] / jnp.where(has_second, second, 1), jnp.inf)
  return HessianEigenvalues(
    eigenvalues=values[:k],
    eigenvectors=eigvecs,
    residuals=residuals,
    ratio=ratio,
    krylov_dim=jnp.sum(run.valid.astype(jnp.int32)),
    converged=converged,
  )


def eigenvalues_per_leaf(
  matvec: Callable[[Any], Any],
  params: Any,
  *,
  key: jax.Array,
  k: int = 1,
  num_steps: Optional[int] = None,
  which: str = 'largest',
) -> Any:
  r"""The leading eigenvalues of the diagonal block of each leaf (a layer's own curvature).

  For leaf :math:`\ell` with its coordinates selected by :math:`P_\ell`, the
  operator restricted to the leaf, :math:`M_{\ell\ell} = P_\ell M
  P_\ell^\top` (the other leaves set to zero, the product's other leaves
  dropped), goes through :func:`eigenvalues`. Its eigenvalues interlace
  :math:`M`'s: :math:`\lambda_{\max}(M_{\ell\ell}) \le \lambda_{\max}(M)`.

  Cost: ``num_steps`` products of ``matvec`` per leaf (each a full product);
  leaves run one after another, each with its own ``fold_in(key, i)``.

  Args:
    matvec: ``matvec(v) -> Mv`` for ``v`` like ``params`` (symmetric :math:`M`).
    params: a template of the vectors (their structure, shapes and dtypes).
    key: PRNG key.
    k: eigenpairs per leaf (static), at most the leaf's size (smaller leaves
      get as many as they have entries).
    num_steps: Lanczos steps per leaf (static); ``None``: ``20 + 2 k``.
    which: ``'largest'`` (algebraic) or ``'magnitude'``.

  Returns:
    A pytree like ``params`` with a :class:`HessianEigenvalues` in place of
    each leaf (its eigenvectors shaped like the leaf, with a leading axis).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> scales = {'a': jnp.array([1.0, 4.0]), 'b': jnp.array([2.0, 3.0, 0.5])}
    >>> matvec = lambda v: jax.tree.map(jnp.multiply, scales, v)
    >>> r = sharpness.eigenvalues_per_leaf(matvec, scales, key=jax.random.key(0))
    >>> print(jnp.round(r['a'].eigenvalues, 4), jnp.round(r['b'].eigenvalues, 4))
    [4.] [3.]

  References:
    Sankar et al., 2021, `A Deeper Look at the Hessian Eigenspectrum of Deep
    Neural Networks and its Applications to Regularization
    <https://arxiv.org/abs/2012.03801>`_ (layer-wise Hessian spectra).
  """
  leaves, treedef = jax.tree.flatten(params)
  results = []
  for i, leaf in enumerate(leaves):

    def restricted(u, i=i):
      parts = [u if j == i else jnp.zeros_like(x) for j, x in enumerate(leaves)]
      return jax.tree.leaves(matvec(jax.tree.unflatten(treedef, parts)))[i]

    size = int(jnp.size(leaf))
    results.append(
      eigenvalues(
        restricted,
        leaf,
        key=jax.random.fold_in(key, i),
        k=min(k, size),
        num_steps=num_steps,
        which=which,
      )
    )
  return jax.tree.unflatten(treedef, results)


def _converged(score: jax.Array, residuals: jax.Array, ok: jax.Array, k: int) -> jax.Array:
  """``[k]``: each leading Ritz value converged, and no unconverged one below could overtake it.

  ``score``, ``residuals`` and ``ok`` are over all Ritz values, ranked (best first).
  """
  scale = jnp.max(jnp.where(ok, jnp.abs(score), 0))
  small = (residuals <= CONVERGENCE_RTOL * scale) | ~ok
  below = jnp.arange(score.shape[0])[None, :] > jnp.arange(k)[:, None]  # [k, m]: j ranked below i
  clear = score[None, :] + residuals[None, :] < (score[:k] - residuals[:k])[:, None]
  blocked = below & ~small[None, :] & ~clear
  return small[:k] & ok[:k] & ~jnp.any(blocked, axis=1)


class SpectralDensity(NamedTuple):
  """Output of :func:`hessian_spectral_density`: Gauss quadrature rules, one per probe.

  Attributes:
    nodes: ``[num_probes, num_steps]`` Ritz values of each probe's Lanczos
      tridiagonal (0 for unused steps, which have weight 0).
    weights: ``[num_probes, num_steps]`` squared first components of the
      eigenvectors of the tridiagonal; each row sums to 1.
  """

  nodes: jax.Array
  weights: jax.Array


@compiled.compiled('num_probes', 'num_steps', 'num_chunks', 'layout')
def hessian_spectral_density(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  *,
  key: jax.Array,
  num_probes: int = DEFAULT_SLQ_PROBES,
  num_steps: int = DEFAULT_SLQ_STEPS,
  num_chunks: int = 1,
  layout: str = 'auto',
) -> SpectralDensity:
  r"""The Hessian's eigenvalue density by stochastic Lanczos quadrature (SLQ).

  The spectral density :math:`\phi(t) = \frac{1}{n} \sum_i \delta(t -
  \lambda_i)` is estimated from ``num_probes`` Rademacher probes
  :math:`v = z / \|z\|`: ``num_steps`` Lanczos steps from :math:`v` give a
  tridiagonal :math:`T = S \Theta S^\top`, and the Gauss quadrature rule with
  nodes :math:`\theta_i` and weights :math:`\tau_i = S_{1i}^2` satisfies

  .. math::

    \sum_i \tau_i \theta_i^j = e_1^\top T^j e_1 = v^\top H^j v
    \quad (0 \le j < 2 m), \qquad
    \mathbb{E}_z [v^\top f(H) v] = \frac{1}{n} \operatorname{tr} f(H),

  so :math:`\phi \approx \frac{1}{P} \sum_{\ell} \sum_i \tau^\ell_i
  \delta(t - \theta^\ell_i)`. Evaluate a smoothed density on a grid with
  :func:`spectral_density_on_grid`. Probes run one after another
  (``lax.map``).

  Cost: ``num_probes * num_steps`` Hessian-vector products; memory
  ``num_steps + 1`` parameter copies and the probes' random bits, drawn up front
  (a 32-bit word per parameter for every 32 probes). Default (4 probes, 32 steps): 128
  products.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`w`.
    batch: the data.
    key: PRNG key of the probes.
    num_probes: number of probe vectors (static).
    num_steps: Lanczos steps per probe (static); the quadrature is exact for
      polynomials of degree below ``2 * num_steps``.
    num_chunks: chunks per product (static), see :func:`hessian_eigenvalues`.
    layout: ``'auto'``, ``'tree'`` or ``'flat'`` (static), see :func:`hessian_eigenvalues`.

  Returns:
    A :class:`SpectralDensity`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> h = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(h * p ** 2)
    >>> d = sharpness.hessian_spectral_density(
    ...     loss_fn, jnp.zeros(4), None, key=jax.random.key(0), num_probes=2, num_steps=8)
    >>> print(jnp.round(jnp.sum(d.weights * d.nodes, axis=1), 4))  # tr(H) / n = 2.5
    [2.5 2.5]

  References:
    Golub and Meurant, "Matrices, Moments and Quadrature with Applications",
    2010; Lin, Saad and Yang, 2016, "Approximating spectral densities of large
    matrices", SIAM Review 58; Ghorbani et al., 2019:
    https://arxiv.org/abs/1901.10159
  """
  chunking.check_num_chunks(num_chunks)
  hvp = hvp_lib.hvp_fn(loss_fn, params, batch, num_chunks)
  options = dict(key=key, num_probes=num_probes, num_steps=num_steps)
  return spectral_density(hvp, params, **options, layout=layout)


def spectral_density(
  matvec: Callable[[Any], Any],
  params: Any,
  *,
  key: jax.Array,
  num_probes: int = DEFAULT_SLQ_PROBES,
  num_steps: int = DEFAULT_SLQ_STEPS,
  layout: str = 'auto',
) -> SpectralDensity:
  r"""The eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

  :func:`hessian_spectral_density` for any product ``matvec(v) -> Mv`` (see
  there for the method). Evaluate a smoothed density with
  :func:`spectral_density_on_grid` and spectral sums :math:`\operatorname{tr}
  f(M)` with their standard errors with :func:`spectral_sum`.

  Args:
    matvec: ``matvec(v) -> Mv`` for ``v`` like ``params`` (symmetric :math:`M`).
    params: a template of the vectors (their structure, shapes and dtypes).
    key: PRNG key of the probes.
    num_probes: number of probe vectors (static).
    num_steps: Lanczos steps per probe (static).
    layout: ``'auto'``, ``'tree'`` or ``'flat'`` (static), as for :func:`eigenvalues`.

  Returns:
    A :class:`SpectralDensity`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> d = sharpness.spectral_density(lambda v: jnp.array([1.0, 2.0, 3.0]) * v,
    ...                                jnp.zeros(3), key=jax.random.key(0), num_probes=2)
    >>> print(jnp.round(jnp.sum(d.weights * d.nodes, axis=1), 4))  # tr(M) / n = 2
    [2. 2.]

  References:
    Golub and Meurant, "Matrices, Moments and Quadrature with Applications",
    2010; Ubaru, Chen and Saad, 2017, "Fast Estimation of tr(f(A)) via
    Stochastic Lanczos Quadrature", SIAM J. Matrix Anal. Appl. 38.
  """
  if vector_layout.resolve(layout, params) == 'flat':
    flat_matvec, template, _ = vector_layout.raveled(matvec, params)
    options = dict(key=key, num_probes=num_probes, num_steps=num_steps)
    return spectral_density(flat_matvec, template, **options, layout='tree')
  numerics.check_integer('num_probes', num_probes)
  numerics.check_integer('num_steps', num_steps)

  probe = hvp_lib.rademacher_probes(key, params, num_probes)

  def one_probe(i):
    run = lanczos_lib.lanczos(matvec, probe(i), num_steps, lanczos_lib.seed_of(key, i))
    values, vectors, ok = lanczos_lib.tridiagonal_eigh(run.alphas, run.betas, run.valid)
    weights = jnp.where(ok, vectors[0] ** 2, 0)
    return jnp.where(ok, values, 0), weights

  nodes, weights = jax.lax.map(one_probe, jnp.arange(num_probes))
  return SpectralDensity(nodes=nodes, weights=weights)


def spectral_density_on_grid(
  density: SpectralDensity, grid: jax.Array, sigma: float | jax.Array
) -> jax.Array:
  r"""The SLQ density smoothed by a Gaussian of width ``sigma``, on ``grid``.

  .. math::

    \hat\phi_\sigma(t) = \frac{1}{P} \sum_{\ell=1}^{P} \sum_i \tau^\ell_i
    \frac{1}{\sigma \sqrt{2\pi}} \exp\!\Big(-\frac{(t - \theta^\ell_i)^2}{2\sigma^2}\Big),

  which integrates to 1 over the real line.

  Args:
    density: a :class:`SpectralDensity`.
    grid: ``[g]`` points :math:`t`.
    sigma: the smoothing width (``> 0``), in eigenvalue units.

  Returns:
    ``[g]`` density values.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> d = sharpness.SpectralDensity(nodes=jnp.array([[0.0, 1.0]]),
    ...                               weights=jnp.array([[0.5, 0.5]]))
    >>> grid = jnp.linspace(-5.0, 6.0, 2001)
    >>> phi = sharpness.spectral_density_on_grid(d, grid, sigma=0.1)
    >>> print(f'{float(jnp.sum(phi) * (grid[1] - grid[0])):.3f}')
    1.000
  """
  numerics.check_range('sigma', sigma)
  if numerics.is_concrete(sigma) and float(sigma) == 0:
    raise ValueError('sigma must be > 0, got 0.0.')
  grid = jnp.asarray(grid)
  sigma = jnp.asarray(sigma, density.nodes.dtype)
  z = (grid[:, None, None] - density.nodes[None]) / sigma
  kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
  return jnp.sum(kernel * density.weights[None], axis=(1, 2)) / density.nodes.shape[0]


def spectral_sum(
  density: SpectralDensity, fn: Callable[[jax.Array], jax.Array], dim: int
) -> trace_estimators.HessianTrace:
  r"""The spectral sum :math:`\operatorname{tr} f(M) = \sum_i f(\lambda_i)` from SLQ, with an error.

  Each probe's Gauss quadrature rule gives :math:`n \sum_i \tau_i f(\theta_i)
  \approx z^\top f(M) z` (the probes are Rademacher vectors of norm
  :math:`\sqrt n`), an unbiased Hutchinson sample of :math:`\operatorname{tr}
  f(M)` up to the quadrature error (0 for polynomials of degree below
  ``2 num_steps``); the estimate is their mean and ``stderr`` their standard
  error across probes, which covers the probe noise, not the quadrature
  error. ``fn=jnp.log`` gives the log-determinant of a positive definite
  :math:`M`; ``fn=lambda t: t ** 2`` the squared Frobenius norm.

  Args:
    density: a :class:`SpectralDensity` with at least 2 probes.
    fn: an elementwise function of the eigenvalues.
    dim: :math:`n`, the number of parameters.

  Returns:
    A :class:`HessianTrace` (the estimate of :math:`\operatorname{tr} f(M)`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> d = sharpness.spectral_density(lambda v: jnp.array([1.0, 2.0, 4.0]) * v,
    ...                                jnp.zeros(3), key=jax.random.key(0), num_probes=2)
    >>> r = sharpness.spectral_sum(d, jnp.log, dim=3)  # log det = log 8
    >>> print(f'{float(r.estimate):.4f} +- {float(r.stderr):.4f}')
    2.0794 +- 0.0000

  References:
    Ubaru, Chen and Saad, 2017, "Fast Estimation of tr(f(A)) via Stochastic
    Lanczos Quadrature", SIAM J. Matrix Anal. Appl. 38.
  """
  numerics.check_integer('dim', dim)
  if density.nodes.shape[0] < 2:
    raise ValueError(f'spectral_sum needs >= 2 probes, got {density.nodes.shape[0]}.')
  used = density.weights > 0
  values = jnp.where(used, fn(jnp.where(used, density.nodes, 1)), 0)
  samples = dim * jnp.sum(density.weights * values, axis=1)
  return trace_estimators.HessianTrace(*trace_estimators._mean_and_stderr(samples))
