"""Measure activation sparsity: per block and projection input, the fraction of entries with
|x| <= threshold, a histogram of log10|x|, for prefill (whole windows at once) and decode
(one token at a time with the KV cache), as a table and a plot.

A threshold of 0 counts exact zeros (what ReLU produces); a small positive threshold
counts near-zeros (what TEAL can drop). `thresholds` may also be a per-projection dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparselm.activation.projections import projection_modules

HIST_EDGES = torch.linspace(-6.0, 2.0, 41)  # log10|x| bins, 0.2 decades wide; outside values clamp


@dataclass
class ProjectionStats:
    below: int = 0
    total: int = 0
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(len(HIST_EDGES) - 1, dtype=torch.long))

    @property
    def fraction(self) -> float:
        return self.below / max(self.total, 1)


@dataclass
class ActivationReport:
    """stats[phase][name], phase in {"prefill", "decode"}."""
    stats: dict[str, dict[str, ProjectionStats]]
    threshold: float | dict[str, float]
    params: dict[str, int] = field(default_factory=dict)  # weights each input multiplies

    def fraction(self, phase: str, name: str) -> float:
        return self.stats[phase][name].fraction

    def overall(self, phase: str) -> float:
        """Model-wide sparsity as TEAL defines it: per-projection fractions weighted by the
        number of weights each input multiplies (what a sparse GEMV skips)."""
        s = self.stats[phase]
        total = sum(self.params.get(n, 1) for n in s)
        return sum(p.fraction * self.params.get(n, 1) for n, p in s.items()) / max(total, 1)

    def rows(self) -> list[dict]:
        names = list(self.stats["prefill"])
        return [{"projection": n, "prefill": self.fraction("prefill", n),
                 "decode": self.fraction("decode", n) if n in self.stats.get("decode", {}) else float("nan")}
                for n in names]

    def table(self) -> str:
        lines = ["| projection input | below threshold, prefill | decode | decode - prefill |",
                 "| --- | --- | --- | --- |"]
        for r in self.rows():
            lines.append(f"| {r['projection']} | {r['prefill']:.3f} | {r['decode']:.3f} | "
                         f"{r['decode'] - r['prefill']:+.3f} |")
        lines.append(f"| all | {self.overall('prefill'):.3f} | {self.overall('decode'):.3f} | "
                     f"{self.overall('decode') - self.overall('prefill'):+.3f} |")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "activation sparsity") -> Path:
        """Left: fraction below threshold per projection (prefill vs decode); right: histograms
        of log10|x| of each projection kind summed over blocks."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        xs = range(len(rows))
        ax1.bar([x - 0.2 for x in xs], [r["prefill"] for r in rows], width=0.4, label="prefill")
        ax1.bar([x + 0.2 for x in xs], [r["decode"] for r in rows], width=0.4, label="decode")
        ax1.set_xticks(list(xs), [r["projection"] for r in rows], rotation=90, fontsize=7)
        ax1.set_ylabel("fraction below threshold")
        ax1.legend()
        kinds: dict[str, torch.Tensor] = {}
        for name, s in self.stats["prefill"].items():
            kind = name.split(".", 1)[1]
            kinds[kind] = kinds.get(kind, torch.zeros_like(s.hist)) + s.hist
        centers = ((HIST_EDGES[1:] + HIST_EDGES[:-1]) / 2).tolist()
        for kind, hist in kinds.items():
            ax2.plot(centers, (hist / hist.sum().clamp_min(1)).tolist(), label=kind)
        ax2.set_xlabel("log10 |x| (prefill)")
        ax2.set_ylabel("fraction of entries")
        ax2.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


@torch.no_grad()
def measure_activations(model: nn.Module, token_ids: torch.Tensor, threshold: float | dict[str, float] = 0.0,
                        decode_tokens: int = 32, prompt_len: int = 16) -> ActivationReport:
    """Statistics of every projection's input over `token_ids` [N, S] (prefill: all windows;
    decode: the first window, `prompt_len` tokens prefilled, then `decode_tokens` single-token
    steps with the KV cache, teacher-forced from the window)."""
    modules = projection_modules(model)
    stats = {"prefill": {n: ProjectionStats() for n in modules}, "decode": {n: ProjectionStats() for n in modules}}
    phase = {"now": "prefill"}

    def make_hook(name):
        t = threshold[name] if isinstance(threshold, dict) else threshold

        def hook(mod, args):
            x = args[0].detach().float()
            tokens = x.numel() // x.shape[-1]
            if phase["now"] == "decode" and tokens != 1:
                return  # the decode prompt's prefill is not counted
            s = stats[phase["now"]][name]
            mag = x.abs()
            s.below += int((mag <= t).sum())
            s.total += mag.numel()
            logs = mag.clamp_min(1e-12).log10().clamp(float(HIST_EDGES[0]), float(HIST_EDGES[-1]) - 1e-6)
            s.hist += torch.histc(logs, bins=len(HIST_EDGES) - 1, min=float(HIST_EDGES[0]),
                                  max=float(HIST_EDGES[-1])).long()
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for i in range(0, token_ids.shape[0], 4):
            model(input_ids=token_ids[i:i + 4].to(device))
        phase["now"] = "decode"
        window = token_ids[:1].to(device)  # [1, S]
        steps = min(decode_tokens, window.shape[1] - prompt_len)
        out = model(input_ids=window[:, :prompt_len], use_cache=True)
        for j in range(steps):
            out = model(input_ids=window[:, prompt_len + j:prompt_len + j + 1], use_cache=True,
                        **{_CACHE_ARG: _cache_of(out)})
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return ActivationReport(stats, threshold, {n: m.weight.numel() for n, m in modules.items()})


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_arg_name() -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this version has."""
    import inspect

    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_arg_name()
