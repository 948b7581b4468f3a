"""Figures of the analyses (matplotlib, the ``analysis`` extra)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from conv2former.errors import UserError

if TYPE_CHECKING:
    from conv2former.analysis.erf import StageErf


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "the figures need matplotlib: install the 'analysis' extra (pip install -e '.[analysis]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_erf(results: Dict[str, List[StageErf]], path: str, resolution: int) -> None:
    """Fig. 4's layout: one row per model, one panel per stage, the log-scaled contribution map (1 = the peak)."""
    from conv2former.analysis.erf import normalised

    plt = _pyplot()
    rows, cols = len(results), max(len(v) for v in results.values())
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    for r, (name, stages) in enumerate(results.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(stages):
                ax.axis("off")
                continue
            erf = stages[c]
            ax.imshow(normalised(erf.scores), cmap="RdYlGn", vmin=0, vmax=1)
            ax.set_title(f"stage {erf.stage + 1}: side {erf.metrics['side_mean']:.0f}px", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"effective receptive fields, {resolution} px input (log10(1 + |grad|), 1 = peak)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(pictures: Sequence[Any], captions: Sequence[str], path: str, title: str, per_row: int = 4) -> None:
    """Pictures (H, W, 3 uint8) in a grid with a caption under each."""
    plt = _pyplot()
    rows = (len(pictures) + per_row - 1) // per_row
    cols = min(per_row, len(pictures))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(pictures):
            ax.imshow(pictures[i])
            ax.set_title(captions[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
