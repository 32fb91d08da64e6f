"""One GPU benchmark of ``estimate_llc``, under 5 minutes on one accelerator. Every figure is a
ratio or a value measured in this one run:

- estimator / bare vmapped SGLD loop (the same ε) on a ~1M-parameter MLP, a GPT-2-small sized
  model (Hugging Face config, random init) and a deep linear network;
- chain-steps per second of the GPT-2-small config on the accelerator against the CPU of the
  same machine;
- λ̂ of deep linear networks of ~10M and ~100M parameters (default settings, automatic step)
  against their exact λ (Aoyagi 2024, ``devinterp.theory``), with the wall time;
- chains per second from 1 to 64 chains on the MLP;
- peak accelerator memory of each part, and the ``chain_chunk_size`` the estimator picks from
  free memory.

    python tools/bench_gpu.py                       # on the first CUDA device
    python tools/bench_gpu.py --device cpu --quick  # tiny sizes: every code path, ~1 minute
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llc  # noqa: E402 - the bare loops and the loop clock live there

from devinterp import estimate_llc  # noqa: E402
from devinterp.llc.data import LossFn, TensorBatches  # noqa: E402
from devinterp.llc.estimate import chains_that_fit  # noqa: E402
from devinterp.llc.problem import Problem  # noqa: E402
from devinterp.models import deep_linear_network, gaussian_nll, teacher_data  # noqa: E402
from devinterp.theory import deep_linear_network_llc  # noqa: E402

# A lent accelerator machine is not shared: wall time throughout (bench_llc times CPU runs in
# process CPU time, which would add up the threads of the CPU reference below).
bench_llc.CLOCK["cpu"] = time.perf_counter


@dataclass(frozen=True)
class Sizes:
    """Every size of the run: ``FULL`` for an accelerator, ``QUICK`` to test the script."""

    mlp: tuple[int, ...]
    gpt2: dict
    gpt2_batch: int
    gpt2_seq: int  # tokens per sequence
    dln: tuple[tuple[tuple[int, ...], int], ...]  # (widths, rank) of each deep linear network
    draws: int  # timed draws of each speed comparison
    cpu_draws: int  # draws of the CPU reference
    scaling: tuple[int, ...]  # chain counts
    dln_chains: int
    dln_draws: int


FULL = Sizes(mlp=(256, 1024, 512, 10),
             gpt2=dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
             gpt2_batch=4, gpt2_seq=128, dln=(((2500, 2500, 600, 2500), 60), ((8500, 8500, 1500, 8500), 150)),
             draws=50, cpu_draws=4, scaling=(1, 2, 4, 8, 16, 32, 64), dln_chains=4,
             dln_draws=200)
QUICK = Sizes(mlp=(32, 64, 10), gpt2=dict(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                          vocab_size=128, bos_token_id=0, eos_token_id=0),
              gpt2_batch=4, gpt2_seq=32, dln=(((12, 12, 4, 12), 2), ((16, 16, 4, 16), 2)), draws=6,
              cpu_draws=4, scaling=(1, 2, 4, 8), dln_chains=2, dln_draws=20)
CHAINS = 8  # chains of every estimator-vs-bare comparison


def peak_memory(device: torch.device) -> str:
    """Peak allocated accelerator memory since the last reset, or n/a on the CPU."""
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def auto_chunk(model: nn.Module, data: tuple[Tensor, Tensor], loss_fn: LossFn, chains: int,
               batch: int, device: torch.device) -> int:
    """The ``chain_chunk_size`` ``estimate_llc`` picks for ``chains`` (none given) from the
    memory free now."""
    anchor = {k: v.detach() for k, v in model.named_parameters()}
    source = TensorBatches(*data, batch, device)
    return chains_that_fit(Problem(model, anchor, {}, loss_fn, None, source, device), chains)


def compare(name: str, model: nn.Module, data: tuple[Tensor, Tensor], loss_fn: LossFn, *,
            eps: float, nbeta: float, batch: int, draws: int, device: torch.device) -> None:
    """Estimator (sgld and the default sampler) vs the bare vmapped loop, same ε, 8 chains."""
    reset_peak(device)
    x, y = data
    d = sum(p.numel() for p in model.parameters())
    common = dict(num_chains=CHAINS, batch_size=batch, nbeta=nbeta, localization=1.0,
                  device=device, seed=0, step_size=eps, num_burnin=0, loss_fn=loss_fn)
    kw = dict(chains=CHAINS, batch=batch, eps=eps, nbeta=nbeta, gamma=1.0, loss_fn=loss_fn)
    bench_llc.vmapped_loop(model, x, y, steps=2, **kw)  # warm-up
    estimate_llc(model, data, num_draws=2, sampler="sgld", **common)
    t_vmap = bench_llc.vmapped_loop(model, x, y, steps=draws, **kw) / draws
    sgld, fixed, cached = bench_llc.loop_and_fixed(model, data, draws, sampler="sgld",
                                                   **common)
    default, _, _ = bench_llc.loop_and_fixed(model, data, draws, **common)
    chunk = auto_chunk(model, data, loss_fn, CHAINS, batch, device)
    print(f"\n{name}: {d:,} parameters, {CHAINS} chains x {draws} draws, batch {batch}, "
          f"eps={eps:g}, {device}")
    print(f"  bare vmapped loop              {1e3 * t_vmap:9.2f} ms/step")
    print(f"  estimate_llc (sgld)            {1e3 * sgld:9.2f} ms/step   ratio {sgld / t_vmap:5.2f}x")
    print(f"  estimate_llc (default sampler) {1e3 * default:9.2f} ms/step   "
          f"ratio {default / t_vmap:5.2f}x")
    print(f"  fixed cost per call            {fixed:9.3f} s (paired baseline: "
          f"{'per-sample cache' if cached else 'one forward per step'})")
    print(f"  chain_chunk_size from free memory: {chunk} of {CHAINS} chains; peak memory "
          f"{peak_memory(device)}")


def mlp_case(sizes: Sizes, device: torch.device) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = bench_llc.mlp(list(sizes.mlp)).to(device)
    x = torch.randn(10_000, sizes.mlp[0], device=device)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(10_000, sizes.mlp[-1], device=device)
    return model, (x, y)


class CausalLM(nn.Module):
    """A Hugging Face causal LM that returns its logits (the estimator's loss_fn takes them)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        # eager attention: its ops all have vmap batching rules
        self.lm = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="eager"))

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids).logits


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross entropy over every position of every sequence."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def gpt2_case(sizes: Sizes, device: torch.device) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = CausalLM(sizes.gpt2).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(sizes.gpt2["vocab_size"], (512, sizes.gpt2_seq + 1), generator=g)
    return model, (ids[:, :-1].to(device), ids[:, 1:].to(device))


def chain_steps_per_s(model: nn.Module, data: tuple[Tensor, Tensor], loss_fn: LossFn, *,
                      chains: int, draws: int, batch: int, eps: float, device: torch.device,
                      window: int | None = None) -> float:
    """Chain-steps per second of estimate_llc's sampling loop (sgld, fixed ε); ``window``:
    see ``bench_llc.StepClock``."""
    step, _, _ = bench_llc.loop_and_fixed(
        model, data, draws, window, loss_fn=loss_fn, num_chains=chains, batch_size=batch,
        nbeta=1000.0, localization=1.0, device=device, seed=0, step_size=eps,
        num_burnin=0, sampler="sgld")
    return chains / step


def gpt2_speedup(sizes: Sizes, model: nn.Module, data: tuple[Tensor, Tensor],
                 device: torch.device) -> None:
    """Chain-steps per second on ``device`` (8 chains) against the CPU (one chain)."""
    eps = 1e-7
    fast = chain_steps_per_s(model, data, next_token_loss, chains=CHAINS, draws=sizes.draws,
                             batch=sizes.gpt2_batch, eps=eps, device=device)
    cpu = torch.device("cpu")
    cpu_model = model.to(cpu)
    cpu_data = tuple(t.to(cpu) for t in data)
    # The CPU's fastest single step (its few draws would otherwise be dominated by the MALA
    # check at draw 0, which the accelerator's 50 draws average in at 4 %): a conservative
    # speed-up.
    slow = chain_steps_per_s(cpu_model, cpu_data, next_token_loss, chains=1,
                             draws=sizes.cpu_draws, batch=sizes.gpt2_batch, eps=eps, device=cpu,
                             window=1)
    model.to(device)
    print(f"  chain-steps/s: {fast:.2f} on {device} ({CHAINS} chains), {slow:.3f} on the CPU "
          f"(1 chain, {torch.get_num_threads()} threads): {fast / slow:.1f}x")


def dln_accuracy(sizes: Sizes, device: torch.device) -> None:
    """λ̂ with default settings (automatic step) of each deep linear network vs its exact λ."""
    print(f"\nDeep linear networks, noiseless teacher, default settings (auto step, "
          f"nβ = n/log n), {sizes.dln_chains} chains x {sizes.dln_draws} draws, {device}:")
    print(f"  {'widths':<26} {'rank':>5} {'params':>12} {'exact λ':>12} {'λ̂':>12} "
          f"{'error':>7} {'wall s':>7} {'chunk':>5} {'peak mem':>9}")
    for widths, rank in sizes.dln:
        reset_peak(device)
        model = deep_linear_network(widths, rank, seed=0)
        x, y = teacher_data(model, widths[0], 2 * widths[0] + 1000, seed=0)
        model, data = model.to(device), (x.to(device), y.to(device))
        exact = deep_linear_network_llc(widths, rank)
        chunk = auto_chunk(model, data, gaussian_nll, sizes.dln_chains, 256, device)
        bench_llc.sync(device)
        t0 = time.perf_counter()
        r = estimate_llc(model, data, gaussian_nll, num_chains=sizes.dln_chains,
                         num_draws=sizes.dln_draws, device=device, seed=0)
        bench_llc.sync(device)
        wall = time.perf_counter() - t0
        d = sum(p.numel() for p in model.parameters())
        print(f"  {'-'.join(map(str, widths)):<26} {rank:>5} {d:>12,} {exact:>12,.1f} "
              f"{r.llc_mean:>12,.1f} {r.llc_mean / exact - 1:>+7.1%} {wall:>7.1f} "
              f"{chunk:>5} {peak_memory(device):>9}")
        del model, data, x, y


def dln_speed(sizes: Sizes, device: torch.device) -> None:
    widths, rank = sizes.dln[0]
    model = deep_linear_network(widths, rank, seed=0)
    x, y = teacher_data(model, widths[0], 2 * widths[0] + 1000, seed=0)
    n = len(x)
    compare(f"deep linear network {'-'.join(map(str, widths))} rank {rank}", model.to(device),
            (x.to(device), y.to(device)), gaussian_nll, eps=1e-7, nbeta=n / math.log(n),
            batch=256, draws=sizes.draws, device=device)


def scaling(sizes: Sizes, model: nn.Module, data: tuple[Tensor, Tensor],
            device: torch.device) -> None:
    """Chains per second of the sampling loop as the number of chains doubles."""
    print(f"\nScaling on the MLP (sgld, fixed step, batch 256, {sizes.draws} draws, "
          f"chain_chunk_size from free memory), {device}:")
    print(f"  {'chains':>6} {'chain-steps/s':>14} {'vs 1 chain':>10} {'chunk':>5} "
          f"{'peak mem':>9}")
    base = None
    for chains in sizes.scaling:
        reset_peak(device)
        rate = chain_steps_per_s(model, data, gaussian_nll, chains=chains, draws=sizes.draws,
                                 batch=256, eps=1e-7, device=device)
        base = base or rate
        chunk = auto_chunk(model, data, gaussian_nll, chains, 256, device)
        print(f"  {chains:>6} {rate:>14.1f} {rate / base:>9.2f}x {chunk:>5} "
              f"{peak_memory(device):>9}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to test the script")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; pass --device cpu (with --quick)")
    sizes = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"devinterp GPU benchmark on {name} ({'quick' if args.quick else 'full'} sizes)")
    model, data = mlp_case(sizes, device)
    n = len(data[0])
    compare("MLP", model, data, gaussian_nll, eps=1e-7, nbeta=n / math.log(n), batch=256,
            draws=sizes.draws, device=device)
    scaling(sizes, model, data, device)
    del model, data
    gpt2, gdata = gpt2_case(sizes, device)
    n = len(gdata[0])
    compare("GPT-2-small config (random init)" if not args.quick else "GPT-2 (tiny config)",
            gpt2, gdata, next_token_loss, eps=1e-7, nbeta=n / math.log(n),
            batch=sizes.gpt2_batch, draws=sizes.draws, device=device)
    gpt2_speedup(sizes, gpt2, gdata, device)
    del gpt2, gdata
    dln_speed(sizes, device)
    dln_accuracy(sizes, device)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
