"""PNG figures for the reports: one place that picks matplotlib's file backend and writes images atomically."""

from __future__ import annotations

from pathlib import Path

from eightbit.fileio import atomic_path

MIN_PNG_BYTES = 2_000  # a figure with axes, labels and data is well above this; an empty canvas is not


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed, same output everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_png(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Write `fig` to `path` as a PNG in one rename (a reader never sees half an image), then close it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        with atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path


def check_png(path: str | Path, min_bytes: int = MIN_PNG_BYTES) -> tuple[int, int]:
    """(width, height) of a valid PNG at `path`; ValueError if it is not a readable PNG of non-trivial size.
    Used by tests and by the reports before they link an image."""
    from PIL import Image

    path = Path(path)
    size = path.stat().st_size
    if size < min_bytes:
        raise ValueError(f"{path} is only {size} bytes: not a real figure")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"{path} is a {image.format}, not a PNG")
            image.verify()
            return image.size
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated files
        raise ValueError(f"{path} is not a readable PNG ({exc})") from exc
