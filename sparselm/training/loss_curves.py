"""Loss-curve plots for sparse training runs (one PNG, one line per run)."""
from __future__ import annotations

from pathlib import Path


def plot_loss_curves(runs: dict[str, dict], path: str | Path, title: str = "sparse training") -> Path:
    """`runs[label] = {"losses": [...], "eval_log": [(step, loss), ...]}`: training loss
    (smoothed over 10 steps, thin) and held-out loss (markers) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, run) in enumerate(runs.items()):
        color = f"C{i % 10}"
        losses = run.get("losses") or []
        if losses:
            k = 10
            smooth = [sum(losses[max(0, j - k + 1):j + 1]) / len(losses[max(0, j - k + 1):j + 1])
                      for j in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, color=color, alpha=0.35, linewidth=1)
        if run.get("eval_log"):
            steps, vals = zip(*run["eval_log"])
            ax.plot(steps, vals, "o-", color=color, label=f"{label} (held-out)", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
