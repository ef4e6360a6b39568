"""optax_sam: the Sharpness-Aware Minimization family as composable Optax transformations."""

from optax_sam import sharpness  # submodule: optax_sam.sharpness.hessian_eigenvalues, ...
from optax_sam._src.adaptive import not_bias_mask
from optax_sam._src.aliases import (
  asam,
  bsam,
  friendly_sam,
  gcsam,
  gsam,
  look_sam,
  lookbehind_sam,
  marwp,
  mrwp,
  preconditioned_sam,
  sam,
  sampa,
  stable_sam,
  unified_sam,
  vasso,
  wsam,
)
from optax_sam._src.corrections import (
  Correction,
  DecoupledMemory,
  decoupled_correction,
  gsam_correction,
  look_sam_correction,
  mixed_correction,
  no_correction,
  stable_correction,
)
from optax_sam._src.cycles import CycleState
from optax_sam._src.functional import functional_value_and_grad
from optax_sam._src.micro_batches import MicroBatches, accumulated_grad_fn, micro_batches
from optax_sam._src.momentum_sam import momentum_sam
from optax_sam._src.nonfinite import SkipNonfiniteState, skip_nonfinite, skipped_steps
from optax_sam._src.pairs import BatchPair, batch_pair
from optax_sam._src.parallel import ParallelSAMState
from optax_sam._src.perturbations import (
  AscentState,
  FriendlyState,
  VassoState,
  ascent,
  centralized_ascent,
  friendly_direction,
  unified_ascent,
  vasso_direction,
)
from optax_sam._src.policies import (
  AESAMState,
  CountState,
  Policy,
  RandomState,
  ae_sam,
  after,
  every,
  randomly,
)
from optax_sam._src.preconditioning import preconditioned_direction
from optax_sam._src.random_weights import (
  FisherMemory,
  NoiseState,
  arwp_correction,
  random_perturbation,
)
from optax_sam._src.sharpness_aware import sharpness_aware
from optax_sam._src.state import (
  MomentumSAMState,
  SAMState,
  TwoPhaseSAMState,
  clean_params,
  is_perturbed,
)
from optax_sam._src.statistics import SAMStatistics, step_statistics
from optax_sam._src.variational import (
  PosteriorState,
  posterior_samples,
  posterior_stddev,
  precision_ascent,
  variational_sam,
)

__version__ = '0.1.0'

__all__ = (
  'AESAMState',
  'AscentState',
  'BatchPair',
  'Correction',
  'CycleState',
  'CountState',
  'DecoupledMemory',
  'FisherMemory',
  'FriendlyState',
  'MicroBatches',
  'MomentumSAMState',
  'NoiseState',
  'ParallelSAMState',
  'Policy',
  'PosteriorState',
  'RandomState',
  'SAMState',
  'SAMStatistics',
  'SkipNonfiniteState',
  'TwoPhaseSAMState',
  'VassoState',
  'accumulated_grad_fn',
  'ae_sam',
  'after',
  'arwp_correction',
  'asam',
  'ascent',
  'batch_pair',
  'bsam',
  'centralized_ascent',
  'clean_params',
  'decoupled_correction',
  'every',
  'friendly_direction',
  'friendly_sam',
  'functional_value_and_grad',
  'gcsam',
  'gsam',
  'gsam_correction',
  'is_perturbed',
  'look_sam',
  'look_sam_correction',
  'lookbehind_sam',
  'marwp',
  'micro_batches',
  'mixed_correction',
  'momentum_sam',
  'mrwp',
  'no_correction',
  'not_bias_mask',
  'posterior_samples',
  'posterior_stddev',
  'precision_ascent',
  'preconditioned_direction',
  'preconditioned_sam',
  'random_perturbation',
  'randomly',
  'sam',
  'sampa',
  'sharpness',
  'sharpness_aware',
  'skip_nonfinite',
  'skipped_steps',
  'stable_correction',
  'stable_sam',
  'step_statistics',
  'unified_ascent',
  'unified_sam',
  'variational_sam',
  'vasso',
  'vasso_direction',
  'wsam',
)
