"""Sharpness diagnostics: the Hessian's spectrum and trace, SAM sharpness and adaptive sharpness.

Every function takes ``loss_fn(params, batch) -> scalar`` (train/eval mode,
RNGs and model state closed over by the caller; :func:`optax_sam.flax.nnx_loss_fn`
builds one from an ``nnx.Module``), is pure and jittable with its budgets
(``k``, ``num_steps``, ``num_probes``, ``num_samples``, ``num_chunks``) static,
draws its randomness from an explicit ``key``, works on the parameter pytree
without flattening it, and returns a ``NamedTuple`` with the error of the
estimate. See ``docs/sharpness.md``.
"""

from optax_sam._src.diagnostics.adaptive_sharpness import (
  AverageSharpness,
  WorstCaseSharpness,
  average_sharpness,
  worst_case_sharpness,
)
from optax_sam._src.diagnostics.directional_sharpness import (
  DirectionalSharpness,
  directional_sharpness,
)
from optax_sam._src.diagnostics.hessian_spectrum import (
  HessianEigenvalues,
  SpectralDensity,
  hessian_eigenvalues,
  hessian_spectral_density,
  spectral_density_on_grid,
)
from optax_sam._src.diagnostics.hvp import hvp_fn
from optax_sam._src.diagnostics.sam_sharpness import SAMSharpness, sam_sharpness
from optax_sam._src.diagnostics.trace_estimators import HessianTrace, hessian_trace

__all__ = (
  'AverageSharpness',
  'DirectionalSharpness',
  'HessianEigenvalues',
  'HessianTrace',
  'SAMSharpness',
  'SpectralDensity',
  'WorstCaseSharpness',
  'average_sharpness',
  'directional_sharpness',
  'hessian_eigenvalues',
  'hessian_spectral_density',
  'hessian_trace',
  'hvp_fn',
  'sam_sharpness',
  'spectral_density_on_grid',
  'worst_case_sharpness',
)
