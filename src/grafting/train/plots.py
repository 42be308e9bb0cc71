"""Training curves as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def write_curves(history: list[dict], out_dir: Path, metric: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_write_bytes
    import io

    train = [h for h in history if h["kind"] == "train"]
    evals = [h for h in history if h["kind"] == "eval"]
    written = []
    panels = [("loss.png", "loss", [("train loss", train, "loss"), ("validation loss", evals, "loss")])]
    if metric != "loss":
        panels.append((f"{metric}.png", metric, [(f"validation {metric}", evals, metric)]))
    for fname, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, rows, key in series:
            rows = [r for r in rows if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o" if len(rows) < 30 else None,
                        label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(out_dir / fname, buf.getvalue())
        written.append(out_dir / fname)
    return written


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_write_bytes
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_bilevel_curves(history: list[dict], out_dir: Path) -> Path:
    """Both levels' losses against inner steps (outer steps sit at the inner step they followed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    inner = [h for h in history if h["kind"] == "inner"]
    outer_at, seen = [], 0
    for h in history:
        if h["kind"] == "inner":
            seen = h["step"]
        elif h["kind"] == "outer":
            outer_at.append((seen, h["loss"]))
    if inner:
        ax.plot([h["step"] for h in inner], [h["loss"] for h in inner], label="inner loss (training rows)", alpha=0.8)
    if outer_at:
        ax.plot([s for s, _ in outer_at], [v for _, v in outer_at], label="outer loss (outer rows)", alpha=0.8)
    ax.set_xlabel("inner optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir / "bilevel.png")


def write_rank_plot(ranks: dict[str, int], r: int, path: Path) -> Path:
    """AutoLoRA: the rank found for each layer (bars), against the searched maximum r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4), dpi=100)
    ax.bar(range(len(names)), [ranks[n] for n in names])
    ax.axhline(r, color="grey", linestyle="--", label=f"searched r = {r}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("rank kept")
    ax.legend()
    return _save(fig, path)
