"""Health of an LLC estimate: ONE table of rules, read by the estimator's warnings and by the
dashboard's flags, so a threshold is never written twice.

A rule flags a diagnostic (a column of the λ̂ table) below ``low`` or above ``high``. Its
``template`` is the plain-words warning ``estimate_llc`` attaches to the result, formatted with
the value (``{value}``) and the result's diagnostics and settings; ``why`` is the short
explanation the dashboard shows next to a flagged value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["HEALTH_RULES", "TARGET_ACCEPTANCE", "TARGET_REL_SE", "HealthRule", "rule_for",
           "warnings_for"]

#: MALA acceptance of a step small enough that discretization barely biases λ̂.
TARGET_ACCEPTANCE = 0.9
#: Relative standard error of λ̂ (over chains) that a default estimate should reach.
TARGET_REL_SE = 0.10


@dataclass(frozen=True)
class HealthRule:
    """Flag ``column`` when its value is below ``low`` or above ``high`` (None: no bound).

    ``when_negative`` names another diagnostic that must be negative for the rule to apply (a
    high fraction of draws below the baseline matters when λ̂ itself is negative); ``warns``:
    the estimator also attaches ``template`` as a warning (else only the dashboard flags it);
    ``per_chain``: the bounds are per chain that did not diverge (a total such as the ESS
    scales with the number of chains).
    """

    column: str
    label: str
    low: float | None
    high: float | None
    why: str
    template: str = ""
    when_negative: str | None = None
    warns: bool = True
    per_chain: bool = False

    def flagged(self, value: Any, row: Mapping[str, Any] | None = None) -> bool:
        """Whether ``value`` (of this rule's column, in ``row``) breaks the rule. NaN (not
        computed) never does; ±inf is compared like any value (an infinite R-hat is bad)."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        row = row or {}
        if self.when_negative is not None:
            other = row.get(self.when_negative)
            if not isinstance(other, (int, float)) or not other < 0:
                return False
        scale = 1.0
        if self.per_chain:
            chains = row.get("num_chains")
            diverged = row.get("num_diverged") or 0
            good = chains - diverged if isinstance(chains, (int, float)) else 1
            scale = max(float(good), 1.0) if math.isfinite(float(good)) else 1.0
        return bool((self.low is not None and value < self.low * scale)
                    or (self.high is not None and value > self.high * scale))


HEALTH_RULES: tuple[HealthRule, ...] = (
    HealthRule("llc_mean", "negative λ̂", 0.0, None,
               "λ̂ < 0: draws fall below the loss at w*, so w* is probably not a local minimum",
               warns=False),
    HealthRule("num_diverged", "diverged chains", None, 0.0,
               "chains diverged and were left out of λ̂: use a smaller step_size",
               "{value} of {num_chains} chains diverged ({first_divergence}) and were left out "
               "of the mean: the step is too large for this posterior; a smaller step_size "
               "(e.g. 10x smaller) avoids this"),
    HealthRule("rhat", "R-hat", None, 1.1,
               "split R-hat > 1.1: the chains disagree or have not mixed; use more draws",
               "split R-hat is {value:.2f} (> 1.1): chains disagree or have not mixed; use "
               "more draws or burn-in"),
    HealthRule("mala_acceptance", "MALA acceptance", 0.5, None,
               "MALA acceptance < 0.5 (healthy is ~0.9): the step size is too large and "
               "inflates λ̂",
               "MALA acceptance is {value:.2f} (healthy is ~0.9): the step size is too large "
               "and inflates λ̂; use a smaller step_size"),
    HealthRule("mala_acceptance", "MALA acceptance", TARGET_ACCEPTANCE, None,
               f"MALA acceptance below {TARGET_ACCEPTANCE}: the step size biases λ̂",
               "MALA acceptance is {value:.3f}, below the " + f"{TARGET_ACCEPTANCE}" + " of a "
               "small enough step: the step size biases λ̂ (usually upward); a smaller "
               "step_size removes the bias"),
    HealthRule("llc_rel_se", "relative s.e. of λ̂", None, TARGET_REL_SE,
               f"the standard error of λ̂ is over {TARGET_REL_SE:.0%} of λ̂: run more draws",
               "λ̂ = {llc_mean:.4g} has a standard error of {llc_se:.2g} ({value:.0%} of λ̂) "
               "over {num_ok_chains} chains; about {draws_needed} draws per chain (now "
               "{num_draws}) or {chains_needed} chains would bring it to "
               + f"{TARGET_REL_SE:.0%}"),
    # λ̂ is a mean over chains and its error bar is the spread of the per-chain means, which
    # needs about 10 effective draws per chain (100 per chain is the bar for posterior
    # quantiles and R-hat, not for a mean): a healthy 4 x 800 plateau of the quickstart has
    # ~33 per chain.
    HealthRule("ess", "ESS", 10.0, None,
               "fewer than 10 effective draws per chain: λ̂'s error bar is unreliable; run more "
               "draws", warns=False, per_chain=True),
    HealthRule("frac_below_baseline", "draws below baseline", None, 0.3,
               "over 30% of draws have a loss below L(w*): the sampler may still be optimizing",
               "{value:.0%} of draws have a loss below the loss at w* and λ̂ is negative: w* is "
               "probably not a local minimum (train longer, or the sampler keeps optimizing)",
               when_negative="llc_mean"),
    HealthRule("drift", "λ̂ trace drift", None, 4.0,
               "the λ̂ trace still climbs between its halves: increase num_burnin or a larger "
               "localization",
               "the λ̂ trace still drifts up ({value:+.1f} spreads between halves): the chains "
               "are still climbing away from w*; increase num_burnin, or a larger localization "
               "keeps them nearer w* (λ̂ then depends on it: report it)"),
    HealthRule("drift", "λ̂ trace drift", -4.0, None,
               "the λ̂ trace still falls between its halves: increase num_burnin",
               "the λ̂ trace still drifts down ({value:+.1f} spreads between halves): increase "
               "num_burnin"),
    HealthRule("draws_converged", "auto draws converged", 0.5, None,
               "num_draws='auto' reached its budget (max_draws) before the chains converged",
               "num_draws='auto' stopped at its budget of {max_draws} draws per chain before "
               "split R-hat <= 1.05 and ESS >= 400 (now R-hat {rhat:.3f}, ESS {ess:.0f}): "
               "raise max_draws; if R-hat stays high, the chains mix too slowly at this step "
               "size and localization"),
    HealthRule("frac_distinct_losses", "distinct losses", 0.05, None,
               "the sampled loss barely changes between draws: the weights barely move",
               "the sampled loss took distinct values at only {value:.1%} of the draws: the "
               "weights barely move (a step below the resolution of {model_dtype}, or a loss "
               "that hardly depends on the sampled weights); λ̂ then reads too low"),
)

_BY_COLUMN: dict[str, tuple[HealthRule, ...]] = {}
for _rule in HEALTH_RULES:
    _BY_COLUMN[_rule.column] = (*_BY_COLUMN.get(_rule.column, ()), _rule)


def rule_for(column: str, value: Any = None, row: Mapping[str, Any] | None = None
             ) -> HealthRule | None:
    """The rule of a λ̂-table column; given a value, the first rule that value breaks
    (``None`` if it breaks none), else the column's first rule."""
    rules = _BY_COLUMN.get(column, ())
    if value is None:
        return rules[0] if rules else None
    return next((r for r in rules if r.flagged(value, row)), None)


def warnings_for(values: Mapping[str, Any]) -> list[str]:
    """The plain-words warnings of every rule that ``values`` (diagnostics and settings of one
    estimate) break, at most one per column, in table order."""
    out, seen = [], set()
    for rule in HEALTH_RULES:
        if not rule.warns or rule.column in seen or rule.column not in values:
            continue
        if rule.flagged(values[rule.column], values):
            seen.add(rule.column)
            out.append(rule.template.format(value=values[rule.column], **values))
    return out
