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
