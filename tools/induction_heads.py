"""Per-head refined λ̂ of the induction language model over training, next to each head's
measured behaviour (Wang et al. 2024, "Differentiation and specialization of attention heads
via the refined LLC", at CPU scale).

    python tools/induction_heads.py [--config configs/induction_lm.yaml]
        [--checkpoints 200 600 1000 1600 3000] [--chains 4] [--draws 100] [--burnin 100]
        [--step-size EPS] [--cache DIR]

Trains the model of the config (its ``model.init_args``, ``trainer.max_steps`` and
``seed_everything``: the same model, data, Adam learning rate and batch size; a plain training
loop instead of the Lightning trainer, so the weights are not bit-identical to ``devinterp run``),
logging ``val_loss_copy`` every 100 steps and keeping the weights at ``--checkpoints``. At each
checkpoint it measures every head's previous-token and induction (prefix-matching) score
(:func:`experiments.induction_lm.head_scores`) and estimates every head's weight-refined λ̂ in
one :func:`devinterp.estimate_refined_llc` call, with the sampler settings of the config's
``LLCCallback`` (fixed ε, nβ, γ at every checkpoint, so the curves are comparable) except the
number of chains and draws (the time budget) and, with ``--step-size``, ε. It prints:

- the validation losses at each checkpoint and the induction-formation window (where
  ``val_loss_copy`` falls: from the last logged step within 10% of the drop below its early
  plateau to the first within 10% of its final value);
- per head: its type from its final scores (``induction``: induction score ≥ 0.2;
  ``previous-token``: previous-token score ≥ 0.2; else ``other``), the scores and λ̂ ± s.e.
  (split R-hat) at each checkpoint;
- whether the induction heads' curves are told apart: each head's change of λ̂ across the
  window in units of its s.e., and the k-means groups of the normalized λ̂ curves (as the
  dashboard groups them) against the score-based types.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devinterp import estimate_refined_llc  # noqa: E402
from devinterp.dashboard.components import group_curves  # noqa: E402
from experiments.induction_lm import InductionLM, head_scores  # noqa: E402

#: A head is of a type when its score of that type reaches this (attention probability).
TYPE_THRESHOLD = 0.2
#: The window's edges: within this fraction of the drop of val_loss_copy.
WINDOW_FRACTION = 0.1


@dataclass
class Training:
    """What training kept: validation losses every ``log_every`` steps, weights at checkpoints."""

    val: pd.DataFrame  # step, val_loss, val_loss_markov, val_loss_copy
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def load_config(path: str | Path) -> dict[str, Any]:
    """The config's model arguments, training steps, seed and LLCCallback sampler settings."""
    cfg = yaml.safe_load(Path(path).read_text())
    sampler = next((c.get("init_args", {}) for c in cfg["trainer"].get("callbacks", [])
                    if c["class_path"].endswith("LLCCallback")), {})
    return {"model": dict(cfg["model"]["init_args"]), "max_steps": int(cfg["trainer"]
            ["max_steps"]), "seed": int(cfg.get("seed_everything", 0)), "sampler": sampler}


@torch.no_grad()
def validation_losses(model: InductionLM) -> dict[str, float]:
    """``val_loss``, ``val_loss_markov`` and ``val_loss_copy`` as the model's validation logs."""
    tokens, targets, copied = model.val_dataset.tensors
    was = model.training
    model.eval()
    losses = F.cross_entropy(model(tokens).transpose(1, 2), targets, reduction="none")
    model.train(was)
    return {"val_loss": float(losses.mean()), "val_loss_markov": float(losses[~copied].mean()),
            "val_loss_copy": float(losses[copied].mean())}


def train(model_args: dict[str, Any], max_steps: int, seed: int, checkpoints: list[int],
          log_every: int = 100) -> tuple[InductionLM, Training]:
    """Train :class:`InductionLM` with Adam for ``max_steps``; keep weights at ``checkpoints``
    and validation losses every ``log_every`` steps (and at step 0)."""
    torch.manual_seed(seed)
    model = InductionLM(**model_args)
    opt = model.configure_optimizers()
    loader = model.train_dataloader()
    rows = [{"step": 0, **validation_losses(model)}]
    out = Training(pd.DataFrame())
    step = 0
    while step < max_steps:
        for tokens, targets in loader:
            loss = model.loss_fn(model(tokens), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % log_every == 0 or step == max_steps:
                rows.append({"step": step, **validation_losses(model)})
            if step in checkpoints:
                out.weights[step] = copy.deepcopy(model.state_dict())
            if step >= max_steps:
                break
    out.val = pd.DataFrame(rows)
    return model, out


def formation_window(val: pd.DataFrame, column: str = "val_loss_copy",
                     fraction: float = WINDOW_FRACTION) -> tuple[int, int]:
    """(start, end) steps of the fall of ``column``: the last logged step still within
    ``fraction`` of the drop of its plateau (its highest value after step 0, so the first
    steps' fall from the uniform guess is not counted), and the first step within ``fraction``
    of the drop of its final value."""
    v = val.sort_values("step")
    steps, y = v["step"].to_numpy(), v[column].to_numpy(dtype=float)
    later = steps > 0
    peak = int(np.flatnonzero(later)[np.argmax(y[later])])
    top, final = y[peak], y[-1]
    drop = top - final
    after = np.arange(len(y)) >= peak
    start = int(steps[after & (y >= top - fraction * drop)].max())
    end = int(steps[after & (steps >= start) & (y <= final + fraction * drop)].min())
    return start, end


def head_type(scores: dict[str, float], threshold: float = TYPE_THRESHOLD) -> str:
    """``induction``, ``previous-token`` or ``other`` from a head's scores (induction first:
    an induction head is the rarer, later one)."""
    if scores["induction"] >= threshold:
        return "induction"
    if scores["previous_token"] >= threshold:
        return "previous-token"
    return "other"


def bracket(checkpoints: list[int], window: tuple[int, int]) -> tuple[int, int]:
    """The checkpoints that bracket ``window``: the last at or before its start (else the
    first) and the first at or after its end (else the last)."""
    cps = sorted(checkpoints)
    before = [c for c in cps if c <= window[0]]
    after = [c for c in cps if c >= window[1]]
    return (before[-1] if before else cps[0]), (after[0] if after else cps[-1])


def change_z(table: pd.DataFrame, a: int, b: int) -> pd.Series:
    """Per head: (λ̂ at step b − λ̂ at step a) / √(se_a² + se_b²)."""
    t = table.set_index(["component", "step"])
    la, lb = t.xs(a, level="step"), t.xs(b, level="step")
    return (lb["llc_mean"] - la["llc_mean"]) / np.sqrt(la["llc_se"] ** 2 + lb["llc_se"] ** 2)


def adjusted_rand(x: list[Any], y: list[Any]) -> float:
    """Adjusted Rand index of two labelings (1: the same partition; ~0: chance)."""
    xs, ys = sorted(set(x), key=str), sorted(set(y), key=str)
    n = np.array([[sum(1 for a, b in zip(x, y, strict=True) if a == i and b == j)
                   for j in ys] for i in xs])

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    total, rows, cols = pairs(n), pairs(n.sum(1)), pairs(n.sum(0))
    expected = rows * cols / pairs(np.array([len(x)]))
    top = 0.5 * (rows + cols)
    return 1.0 if top == expected else (total - expected) / (top - expected)


def estimate_heads(model: InductionLM, sampler: dict[str, Any]) -> pd.DataFrame:
    """Every head's refined λ̂ at the model's weights: one row per head."""
    tokens, targets = model.train_dataset.tensors
    out = estimate_refined_llc(model, (tokens, targets), model.loss_fn, components="heads",
                               **sampler)
    return pd.DataFrame([{"component": k, "llc_mean": r.llc_mean,
                          "llc_se": r.diagnostics["llc_se"], "rhat": r.diagnostics["rhat"],
                          "num_diverged": r.diagnostics["num_diverged"]}
                         for k, r in out.items()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/induction_lm.yaml")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[200, 600, 1000, 1600, 3000])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--burnin", type=int, default=100)
    p.add_argument("--step-size", type=float, help="override the config's LLCCallback ε")
    p.add_argument("--max-steps", type=int, help="override the config's trainer.max_steps")
    p.add_argument("--cache", help="save the trained checkpoints here / load them if present")
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    max_steps = args.max_steps or cfg["max_steps"]
    cps = sorted(c for c in args.checkpoints if c <= max_steps)
    cache = Path(args.cache) / "induction_heads.pt" if args.cache else None
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        model = InductionLM(**cfg["model"])
        training = Training(pd.DataFrame(saved["val"]), saved["weights"])
    else:
        model, training = train(cfg["model"], max_steps, cfg["seed"], cps)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"val": training.val.to_dict("list"), "weights": training.weights},
                       cache)
    t_train = time.perf_counter() - t0
    keys = ("batch_size", "sampler", "step_size", "nbeta", "localization")
    sampler = {k: cfg["sampler"][k] for k in keys if k in cfg["sampler"]}
    if args.step_size is not None:
        sampler["step_size"] = args.step_size
    sampler.update(num_chains=args.chains, num_draws=args.draws, num_burnin=args.burnin,
                   seed=cfg["seed"])
    scores, llcs, vals = {}, [], []
    for step in cps:
        model.load_state_dict(training.weights[step])
        scores[step] = head_scores(model)
        vals.append({"step": step, **validation_losses(model)})
        llcs.append(estimate_heads(model, sampler).assign(step=step))
    table = pd.concat(llcs, ignore_index=True)
    report(cfg, args, sampler, training, pd.DataFrame(vals), scores, table,
           t_train, time.perf_counter() - t0)


def report(cfg: dict[str, Any], args: argparse.Namespace, sampler: dict[str, Any],
           training: Training, vals: pd.DataFrame, scores: dict[int, dict[str, dict]],
           table: pd.DataFrame, t_train: float, t_total: float) -> None:
    """Print the settings, the per-head table and the comparison with Wang et al."""
    cps = sorted(scores)
    heads = list(scores[cps[-1]])
    m = cfg["model"]
    print(f"InductionLM: {m['num_layers']} layers × {m['num_heads']} heads, width "
          f"{m['width']}, {m['num_samples']} sequences of {m['seq_len']} tokens; trained "
          f"{int(training.val['step'].max())} steps in {t_train:.0f} s")
    print("refined λ̂ per head: " + ", ".join(f"{k}={v}" for k, v in sampler.items()))
    window = formation_window(training.val)
    print(f"induction formation window (val_loss_copy falls): steps {window[0]}–{window[1]}")
    print(vals.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    types = {h: head_type(scores[cps[-1]][h]) for h in heads}
    print(f"\nhead types from the scores at step {cps[-1]} (score ≥ {TYPE_THRESHOLD})")
    t = table.set_index(["component", "step"])
    header = f"{'head':5} {'type':14}" + "".join(f" | step {s:<27}" for s in cps)
    print(header + "\n" + f"{'':20}" + " | prev  ind   λ̂ ± se  (R-hat)" * len(cps))
    for h in heads:
        cells = []
        for s in cps:
            r = t.loc[(h, s)]
            cells.append(f" | {scores[s][h]['previous_token']:.2f}  "
                         f"{scores[s][h]['induction']:.2f}  {r['llc_mean']:5.2f} ± "
                         f"{r['llc_se']:4.2f} ({r['rhat']:.2f})")
        print(f"{h:5} {types[h]:14}" + "".join(cells))
    rhat = table["rhat"].max()
    print(f"\nsplit R-hat: max {rhat:.2f}, {int((table['rhat'] > 1.1).sum())} of {len(table)} "
          f"(head, checkpoint) estimates above 1.1" + ("" if rhat <= 1.1 else
          " — those chains have not mixed; their λ̂ is a short-run value"))
    print(f"diverged chains: {int(table['num_diverged'].sum())}")
    a, b = bracket(cps, window)
    z = change_z(table, a, b)
    print(f"\nchange of λ̂ from step {a} to {b} (brackets the window), in s.e.:")
    for kind in ("induction", "previous-token", "other"):
        members = [h for h in heads if types[h] == kind]
        if members:
            print(f"  {kind:15} " + ", ".join(f"{h} {z[h]:+.1f}" for h in members))
    k = max(2, len(set(types.values())))
    groups = group_curves(table[["component", "step", "llc_mean"]], k=k)
    labels = [groups[h] for h in heads]
    print(f"k-means groups of the normalized λ̂ curves (k = {k}): "
          + ", ".join(f"{h}:{g + 1}" for h, g in zip(heads, labels, strict=True)))
    for name, ref in (("score-based types", [types[h] for h in heads]),
                      ("layers", [h.split("H")[0] for h in heads])):
        print(f"agreement with the {name}: adjusted Rand index "
              f"{adjusted_rand(labels, ref):.2f}")
    print(f"total time {t_total:.0f} s")


if __name__ == "__main__":
    main()
