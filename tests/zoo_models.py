"""Tiny random-init versions of models the field trains, for ``tests/test_model_zoo.py``.

Every model is built from a config in code (nothing is downloaded) and is small enough that an
estimate takes about a second. Hugging Face and TransformerLens are imported inside the
builders only, so this module imports without them. The LightningModules are ordinary training
code: no ``loss_fn`` attribute and no ``llc_batch_loss`` method, so ``LLCCallback`` has to take
the loss from ``training_step``. They live here, importable by name, so a run directory's
``run.json`` can name them.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

VOCAB = 64
SEQ_LEN = 12


class TokenDataset(Dataset):
    """``n`` token sequences as Hugging Face dict items ``{"input_ids", "attention_mask",
    "labels"}``; each sequence counts up modulo ``vocab`` from a random start, so the next
    token is learnable."""

    def __init__(self, n: int = 64, seq_len: int = SEQ_LEN, vocab: int = VOCAB,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def gpt2() -> nn.Module:
    """A 1-layer GPT-2 (``GPT2LMHeadModel``): ``lm_head.weight`` is ``transformer.wte.weight``
    (tied), and attention is the default implementation (``sdpa``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))


def llama() -> nn.Module:
    """A 1-layer Llama (``LlamaForCausalLM``): RMSNorm, rotary embeddings, grouped-query
    attention (2 query heads share 1 key/value head), SwiGLU, untied head, default attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def hooked_transformer() -> nn.Module:
    """A 1-layer attention-only TransformerLens ``HookedTransformer``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=VOCAB, attn_only=True,
        act_fn=None))


def hf_loss(model: Callable[..., object], batch: dict[str, Tensor]) -> Tensor:
    """A Hugging Face causal LM's own loss on a dict batch."""
    return model(**batch).loss


def hooked_loss(model: Callable[..., Tensor], batch: dict[str, Tensor]) -> Tensor:
    """A HookedTransformer's own next-token loss on a dict batch."""
    return model(batch["input_ids"], return_type="loss")


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear on 1x8x8 images, 3 classes."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def image_data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images (n, 1, 8, 8) and labels in {0, 1, 2} that depend on the image (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x[:, 0, :4].sum(dim=(1, 2)) > 0).long() + (x[:, 0, 4:].mean(dim=(1, 2)) > 0.3)


class Recurrent(nn.Module):
    """A 1-layer GRU or LSTM over the sequence, a linear read-out of its last hidden state."""

    def __init__(self, cell: str = "gru", hidden: int = 8) -> None:
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](3, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def sequence_data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sequences (n, 5, 3) and a target, the running sum of their first feature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 3, generator=g)
    return x, x[:, :, :1].sum(dim=1)


def mlp(seed: int = 0) -> nn.Sequential:
    """A 4-8-1 tanh MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def regression_data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs (n, 4) and targets of a fixed nonlinear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]))


class EarlyExit(nn.Module):
    """Adaptive depth: a second layer runs only when the batch's hidden state is large, a
    Python ``if`` on a tensor that ``torch.func.vmap`` cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if h.norm() > 1.0:
            h = torch.tanh(self.b(h))
        return self.out(h)


# -- LightningModules: unchanged training code ---------------------------------------------------
class CausalLMModule(pl.LightningModule):
    """Trains a Hugging Face causal LM on dict batches with the model's own loss."""

    def __init__(self, arch: str = "gpt2", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = {"gpt2": gpt2, "llama": llama}[arch]()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class HookedLMModule(pl.LightningModule):
    """Trains an attention-only HookedTransformer on dict batches with its own loss."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = hooked_transformer()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(batch["input_ids"], return_type="loss")
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class SupervisedModule(pl.LightningModule):
    """Trains one of the small non-transformer models on ``(x, y)`` batches; the loss is
    written in ``training_step`` (no ``loss_fn`` attribute).

    ``kind``: ``"cnn"`` (BatchNorm, Dropout; cross entropy), ``"gru"``, ``"lstm"``,
    ``"compiled"`` (a ``torch.compile``d MLP), ``"frozen"`` (an MLP whose first layer is
    frozen), ``"parametrized"`` (an MLP whose first weight is symmetric by
    ``torch.nn.utils.parametrize``), ``"early_exit"`` (:class:`EarlyExit`); the loss is
    :func:`supervised_loss`.
    """

    def __init__(self, kind: str = "cnn", lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.kind = kind
        if kind == "cnn":
            self.model: nn.Module = CNN()
        elif kind in ("gru", "lstm"):
            self.model = Recurrent(kind)
        elif kind == "compiled":
            self.model = torch.compile(mlp())
        elif kind == "frozen":
            self.model = frozen_mlp()
        elif kind == "parametrized":
            self.model = symmetric_mlp()
        elif kind == "early_exit":
            self.model = EarlyExit()
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = supervised_loss(self.kind, self.model, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad],
                               lr=self.hparams.lr)

    def dataset(self) -> TensorDataset:
        """The training data for this kind of model."""
        if self.kind == "cnn":
            return TensorDataset(*image_data())
        if self.kind in ("gru", "lstm"):
            return TensorDataset(*sequence_data())
        return TensorDataset(*regression_data())


def supervised_loss(kind: str, model: Callable[[Tensor], Tensor],
                    batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training loss of a :class:`SupervisedModule` of this ``kind`` on an ``(x, y)``
    batch: cross entropy for the CNN, mean squared error otherwise."""
    x, y = batch
    out = model(x)
    return F.cross_entropy(out, y) if kind == "cnn" else F.mse_loss(out, y)


def frozen_mlp(seed: int = 0) -> nn.Sequential:
    """:func:`mlp` with its first layer frozen (``requires_grad=False``)."""
    model = mlp(seed)
    model[0].requires_grad_(False)
    return model


class Symmetric(nn.Module):
    """A parametrization: the weight is the symmetric matrix built from the original's upper
    triangle."""

    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).T


class Same(nn.Module):
    """The identity parametrization (the weight is the original)."""

    def forward(self, w: Tensor) -> Tensor:
        return w


def symmetric_mlp(seed: int = 0) -> nn.Sequential:
    """A 4-4-1 tanh MLP whose first weight is symmetric by parametrization."""
    from torch.nn.utils import parametrize

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model
