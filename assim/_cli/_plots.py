"""PNG plots of an assim-run analysis (matplotlib, written atomically)."""

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(
    out,
    *,
    grid,
    times,
    snapshots,
    series,
    estimated,
    true_parameter,
    parameter_name,
    history=None,
    window_times=None,
):
    """`fields.png` (truth / observations / analysis / error at a few times),
    `parameter.png` (estimated vs true coefficient; a scalar's estimate window
    by window), `rmse.png` (RMSE over time).

    `snapshots`: `analysis`, `observations` (NaN where none) and, in a twin
    experiment, `truth` at `times`; `series`: `time` and the RMSE per time of the
    `analysis` and (against the truth) of the `background`."""
    from assim._io import savefig

    plt = _pyplot()
    analysis = snapshots["analysis"]
    reference = snapshots.get("truth")
    columns = [("analysis", analysis)]
    if "observations" in snapshots:
        columns.insert(0, ("observations", snapshots["observations"]))
    if reference is not None:
        columns = [("truth", reference), *columns, ("error", analysis - reference)]
    fig, axes = plt.subplots(
        len(times),
        len(columns),
        figsize=(3.2 * len(columns), 2.8 * len(times)),
        squeeze=False,
    )
    vmax = float(np.nanmax(np.abs(analysis)))
    for row, t in enumerate(times):
        for col, (name, field) in enumerate(columns):
            ax = axes[row, col]
            if grid.ndim == 2:
                scale = (
                    vmax
                    if name != "error"
                    else max(float(np.max(np.abs(field[row]))), 1e-12)
                )
                im = ax.imshow(
                    field[row], origin="lower", cmap="RdBu_r", vmin=-scale, vmax=scale
                )
                fig.colorbar(im, ax=ax, shrink=0.8)
            else:
                x = np.asarray(grid.coordinates(0))
                style = "." if name == "observations" else "-"
                ax.plot(x, field[row], style)
            ax.set_title(f"{name}, t={t:.3g}", fontsize=9)
    fig.tight_layout()
    savefig(fig, out / "fields.png")
    plt.close(fig)

    if estimated is not None and np.ndim(estimated) == 0:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(window_times, history, "o-", label="estimate after the window")
        if true_parameter is not None:
            ax.axhline(float(true_parameter), color="k", ls="--", label="truth")
        ax.set_xlabel("window start time")
        ax.set_ylabel(parameter_name)
        ax.legend()
        fig.tight_layout()
        savefig(fig, out / "parameter.png")
        plt.close(fig)
    elif estimated is not None:
        panels = [("estimated", estimated)]
        if true_parameter is not None:
            panels.append(("true", true_parameter))
        fig, axes = plt.subplots(
            1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False
        )
        lo = min(float(np.min(p)) for _, p in panels)
        hi = max(float(np.max(p)) for _, p in panels)
        for ax, (name, field) in zip(axes[0], panels, strict=True):
            if np.ndim(field) == 2:
                im = ax.imshow(field, origin="lower", vmin=lo, vmax=hi)
                fig.colorbar(im, ax=ax, shrink=0.8)
            else:
                ax.plot(np.asarray(grid.coordinates(0)), field)
            ax.set_title(f"{name} {parameter_name}")
        fig.tight_layout()
        savefig(fig, out / "parameter.png")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(series["time"], series["analysis"], label="analysis")
    if series.get("background"):
        ax.plot(series["time"], series["background"], label="background")
        ax.set_ylabel("RMSE vs truth")
    else:
        ax.set_ylabel("RMSE vs observations")
    ax.set_yscale("log")
    ax.set_xlabel("time")
    ax.legend()
    fig.tight_layout()
    savefig(fig, out / "rmse.png")
    plt.close(fig)
