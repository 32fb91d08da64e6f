"""Local learning coefficient estimation: λ̂ = nβ·(E_w[L(w)] − L(w*)) by localized, tempered SGLD.

The posterior sampled is p(w) ∝ exp(−nβ·L_n(w) − (γ/2)·‖w − w*‖²) (Lau et al. 2023,
arXiv 2308.12108). Chains are batched into one computation with ``torch.func.vmap`` over a
stacked copy of the trainable parameters; a sequential path (``vectorize=False``) runs the same
chains one by one with the same random numbers.

The baseline is *paired*: at every draw, L_B(w*) is computed on the very minibatch B on which the
chains' L_B(w_t) is computed, and λ̂ averages the differences. Minibatch noise common to both
cancels, so the baseline is neither noisier than the draws nor biased relative to them (a
baseline averaged over other minibatches adds nβ·noise to every chain alike, and at
nβ = n/log n that noise can swamp λ). All chains share the minibatch of a step, so the paired
baseline costs one extra forward pass per step, whatever the number of chains.

Layout (one job per module): :mod:`~devinterp.llc.estimate` (the entry point),
:mod:`~devinterp.llc.problem` (the loss at sampled weights, checks), :mod:`~devinterp.llc.data`
(minibatch sources), :mod:`~devinterp.llc.driver` (the chain loop and its recorders),
:mod:`~devinterp.llc.calibration` (the automatic step), :mod:`~devinterp.llc.result`
(:class:`LLCResult`), :mod:`~devinterp.llc.errors`. The samplers themselves are kernels in
:mod:`devinterp.samplers`; their options live in :class:`devinterp.config.SamplerConfig`.
"""

from devinterp.config import check_weights
from devinterp.llc.errors import (
    AllChainsDivergedError,
    NonFiniteCurvatureError,
    NonFiniteLossError,
)
from devinterp.llc.estimate import (
    DEFAULT_LOCALIZATION,
    SMALL_MODEL_WORK,
    calibrate_step_size,
    estimate_llc,
)
from devinterp.llc.observables import ProbeLosses
from devinterp.llc.problem import at_weights, parameter_aliases, sampled_parameters
from devinterp.llc.refined import estimate_refined_llc
from devinterp.llc.result import LLCResult, merge_results

__all__ = [
    "DEFAULT_LOCALIZATION", "SMALL_MODEL_WORK", "AllChainsDivergedError", "LLCResult",
    "NonFiniteCurvatureError", "NonFiniteLossError", "ProbeLosses", "at_weights", "calibrate_step_size",
    "check_weights", "estimate_llc", "estimate_refined_llc", "merge_results", "parameter_aliases",
    "sampled_parameters",
]
