"""Canonical experiments of developmental interpretability, one readable file each.

Each file holds the model, its data (generated in code from a ``seed``, no downloads) and a
LightningModule that follows the conventions ``devinterp run`` and ``devinterp.LLCCallback``
rely on: ``save_hyperparameters()``, a ``loss_fn(outputs, targets)`` attribute (a negative
log-likelihood up to a constant), ``(inputs, targets)`` batches with ``forward(inputs)``, a
``train_dataset`` and ``train_dataloader()``, and ``train_loss`` logged every step. Each has a
config in ``configs/``.

- :mod:`experiments.deep_linear`: a deep linear network learns a low-rank teacher mode by mode;
  λ̂ at convergence approaches Aoyagi's exact value.
- :mod:`experiments.tms`: the toy model of superposition (Chen et al. 2023), with the exact
  population loss of any configuration and of the k-gon critical points.
- :mod:`experiments.modular_addition`: an MLP that groks (a + b) mod p.
- :mod:`experiments.icl_regression`: in-context linear regression (Hoogland et al. 2025).
- :mod:`experiments.induction_lm`: an attention-only language model: bigrams, then induction.
- :mod:`experiments.transformer`: the small causal transformer the last two share.
"""

__all__ = [
    "deep_linear",
    "icl_regression",
    "induction_lm",
    "modular_addition",
    "tms",
    "transformer",
]
