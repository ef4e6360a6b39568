"""Sharpness diagnostics: the Hessian's spectrum and trace, SAM sharpness and adaptive sharpness.

The ``hessian_*`` functions and the sharpness measures take
``loss_fn(params, batch) -> scalar`` (train/eval mode,
RNGs and model state closed over by the caller; :func:`optax_sam.flax.nnx_loss_fn`
builds one from an ``nnx.Module``), is pure and jittable with its budgets
(``k``, ``num_steps``, ``num_probes``, ``num_samples``, ``num_chunks``) static,
draws its randomness from an explicit ``key``, never flattens or copies the
parameters (the Krylov vectors and probes are raveled only where no parameter
is sharded: ``layout``), and returns a ``NamedTuple`` with the error of the
estimate. The general estimators (``eigenvalues``, ``trace``, ``diagonal``,
``spectral_density``, ``eigenvalues_per_leaf``) take instead any curvature
operator ``matvec(v) -> Mv``: ``hessian_operator``, ``ggn_operator``,
``fisher_operator`` or a user's own. See ``docs/sharpness.md``.
"""

from optax_sam._src.diagnostics.adaptive_sharpness import (
  AverageSharpness,
  WorstCaseSharpness,
  average_sharpness,
  worst_case_sharpness,
)
from optax_sam._src.diagnostics.curvature import fisher_operator, ggn_operator, hessian_operator
from optax_sam._src.diagnostics.diagonal_estimators import Diagonal, diagonal
from optax_sam._src.diagnostics.directional_sharpness import (
  DirectionalSharpness,
  directional_sharpness,
)
from optax_sam._src.diagnostics.gradient_paths import SAMGradientPaths, sam_gradient_paths
from optax_sam._src.diagnostics.hessian_spectrum import (
  HessianEigenvalues,
  SpectralDensity,
  eigenvalues,
  eigenvalues_per_leaf,
  hessian_eigenvalues,
  hessian_spectral_density,
  spectral_density,
  spectral_density_on_grid,
  spectral_sum,
)
from optax_sam._src.diagnostics.hvp import hvp_fn
from optax_sam._src.diagnostics.sam_sharpness import SAMSharpness, sam_sharpness
from optax_sam._src.diagnostics.trace_estimators import HessianTrace, hessian_trace, trace

__all__ = (
  'AverageSharpness',
  'Diagonal',
  'DirectionalSharpness',
  'HessianEigenvalues',
  'HessianTrace',
  'SAMGradientPaths',
  'SAMSharpness',
  'SpectralDensity',
  'WorstCaseSharpness',
  'average_sharpness',
  'diagonal',
  'directional_sharpness',
  'eigenvalues',
  'eigenvalues_per_leaf',
  'fisher_operator',
  'ggn_operator',
  'hessian_eigenvalues',
  'hessian_operator',
  'hessian_spectral_density',
  'hessian_trace',
  'hvp_fn',
  'sam_gradient_paths',
  'sam_sharpness',
  'spectral_density',
  'spectral_density_on_grid',
  'spectral_sum',
  'trace',
  'worst_case_sharpness',
)
