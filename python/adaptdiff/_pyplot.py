"""matplotlib's ``pyplot`` for writing figures to files, imported only when a figure is drawn."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display is needed or opened).

    matplotlib is an optional dependency (the ``demo``, ``bench`` and ``test`` extras)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "adaptdiff draws its figures with matplotlib: pip install matplotlib"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
