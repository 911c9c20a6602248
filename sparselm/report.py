"""Results as a Markdown table, a JSON file and a PNG plot."""
from __future__ import annotations

import json
import os
from pathlib import Path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec such as '.2%' or '.3f' or '')."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key, "")
            cells.append(format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def plot_perplexity_vs_sparsity(rows: list[dict], path: Path, title: str) -> None:
    """One line per (method, pattern family) over sparsity; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = [r for r in rows if r["method"] == "dense"]
    pruned = [r for r in rows if r["method"] != "dense"]
    if len({round(r["sparsity"], 2) for r in pruned}) == 1:  # one sparsity: bars read better than points
        _bars(ax, pruned, dense, title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    if dense:
        ax.axhline(dense[0]["perplexity"], color="black", linestyle="--", linewidth=1, label="dense")
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        kind = "unstructured" if r["pattern"] == "unstructured" else "N:M"
        label = _label(r)
        groups.setdefault((label, kind), []).append(r)
    for (label, kind), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["sparsity"])
        xs, ys = [r["sparsity"] for r in rs], [r["perplexity"] for r in rs]
        if kind == "unstructured":
            ax.plot(xs, ys, marker="o", label=f"{label} (unstructured)")
        else:
            ax.scatter(xs, ys, marker="s", label=f"{label} ({', '.join(r['pattern'] for r in rs)})")
            for r in rs:
                ax.annotate(r["pattern"], (r["sparsity"], r["perplexity"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("measured sparsity of the linear layers")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bars(ax, pruned: list[dict], dense: list[dict], title: str) -> None:
    patterns = list(dict.fromkeys(r["pattern"] for r in pruned))
    methods = list(dict.fromkeys(_label(r) for r in pruned))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        for i, p in enumerate(patterns):
            rs = [r for r in pruned if _label(r) == m and r["pattern"] == p]
            if rs:
                ax.bar(i + j * width, rs[0]["perplexity"], width, color=f"C{j}", label=m if i == 0 else None)
                ax.annotate(f"{rs[0]['perplexity']:.1f}", (i + j * width, rs[0]["perplexity"]), ha="center",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    if dense:
        ax.axhline(dense[0]["perplexity"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(patterns))],
                  [f"{p} ({pruned[0]['sparsity']:.0%})" for p in patterns])
    lo = min(r["perplexity"] for r in pruned + dense)
    ax.set_ylim(lo * 0.95, max(r["perplexity"] for r in pruned) * 1.03)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _label(r: dict) -> str:
    return r["method"] + (" +OWL" if r.get("owl") else "") + (" +refine" if r.get("refine") else "")
