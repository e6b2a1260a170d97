"""One cycling loop and one batched map over any analyser: windows assimilated in
turn, each background the previous analysis's forecast (`cycle`), or independently
from one background, vmapped and split over devices (`assimilate`); each window's
result with its diagnostics (`WindowResult`)."""

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._adaptive import AdaptationState, InnovationAdaptation
from ._analyser import AbstractAnalyser, outcome_name
from ._batch import Batch
from ._ensemble import AbstractEnsembleAnalyser, Ensemble
from ._metrics import innovation_statistics, rmse
from ._observations import ObservationSet
from ._parallel import map_windows
from ._problem import WindowProblem


class ForecastFailed(RuntimeError):
    """A window's analysis could not be forecast (the model blew up from it), so
    cycling cannot go on."""


def check_forecast(forecast, index: int) -> None:
    """Refuse a non-finite forecast (the next window's background, a state or an
    `Ensemble`) on the host."""
    states = forecast.members if isinstance(forecast, Ensemble) else forecast
    if not np.all(np.isfinite(np.asarray(states))):
        raise ForecastFailed(
            f"window {index}: the forecast from its analysis became non-finite: the "
            "model blew up from this analysis (a background or step far outside "
            "the model's range), or the time step is too long for the scheme"
        )


class WindowsFailed(RuntimeError):
    """Some windows' analyses failed (a non-finite cost, a solver failure); the
    others were written. The message says how many and which first."""


@dataclasses.dataclass
class WindowResult:
    """One assimilation window, on the host.

    - `times`: observation times of the window.
    - `analysis`, `background`: model states at those times from the analysis and
      from the background (the forecast that the window started from).
    - `theta`: estimated parameters (their controls), or `None`.
    - `steps`, `outcome`, `converged`: iterations (or layers) and how the analysis
      ended (`assim.OUTCOMES`).
    - `cost`, `grad_norm`: the window cost and its gradient norm at the background
      and at the analysis (`(2,)`, the same cost for every analyser).
    - `cost_history`, `grad_norm_history`: per iteration where the analyser
      iterates on the cost (else the two values above).
    - `diagnostics`: scalars: innovation statistics of the background, RMSEs against
      the truth when the window has one.
    - `window`: the window's observations (with any withheld for scoring).
    - `spread`: an ensemble analyser's spread (members' std) at those times, else
      `None`.
    """

    times: np.ndarray
    analysis: np.ndarray | None
    background: np.ndarray | None
    theta: object
    steps: int
    outcome: str
    cost: np.ndarray
    grad_norm: np.ndarray
    cost_history: np.ndarray
    grad_norm_history: np.ndarray
    diagnostics: dict
    window: ObservationSet | None = None
    spread: np.ndarray | None = None

    @property
    def converged(self) -> bool:
        return self.outcome == "converged"


def analyse_window(
    analyser: AbstractAnalyser,
    problem: WindowProblem,
    window: ObservationSet,
    background: Array,
    adaptation: InnovationAdaptation | None = None,
    state: AdaptationState | None = None,
    shift: int | None = None,
) -> dict:
    """One window's analysis and everything reported of it (arrays: jit- and
    vmap-able): the analysis, the analyser's `Info`, the trajectories from the
    background and from the analysis, the problem's cost and gradient norm at both,
    and the next window's background (the analysis `shift` observation times
    after the window's start, default the time after its last). With
    `adaptation`, the window is analysed with the error scales of `state` (the
    adaptation's so far), and the state updated by the window's statistics is
    returned as `"adaptation"`. An ensemble analyser's background is an
    `Ensemble`; its report adds the analysis spread (`"spread"`) and its forecast
    is the next window's ensemble."""
    if isinstance(analyser, AbstractEnsembleAnalyser):
        if adaptation is not None or shift is not None:
            raise ValueError(
                "ensemble analysers cycle consecutive windows with their own "
                "inflation: no shift (sliding windows) and no adaptation"
            )
        return analyser.analyse_window(problem, window, background)
    base_window = window
    if adaptation is not None:
        problem, window = adaptation.apply(problem, window, state)
    # Nothing raises inside the program (a raising check is a host callback, and
    # JAX's persistent compilation cache stores no program holding one): an
    # analysis the model cannot integrate has an infinite cost (a failed window,
    # on the host), a non-finite forecast is refused on the host
    # (`check_forecast`). Iterative analysers back off from trial steps that
    # blow up (`tolerating_blow_up`).
    analysis, info = analyser(problem.without_raising(), window, background)
    model = analyser.model_problem(problem).tolerating_blow_up()
    n = window.n_times
    start = model.initial_control(window, background)
    first = model.trajectory(model.analysis(start, background), n)
    trajectory = model.trajectory(analysis, n)
    if info.cost is not None:  # the analyser's own record, at its first and last
        cost = info.cost[jnp.stack([0, info.steps])]
        grad_norm = info.grad_norm[jnp.stack([0, info.steps])]
    else:
        at_start = model.value_and_grad_norm(start, window, background)
        at_end = model.value_and_grad_norm(
            model.control(analysis, background), window, background
        )
        cost = jnp.stack([at_start[0], at_end[0]])
        grad_norm = jnp.stack([at_start[1], at_end[1]])
    if adaptation is not None:
        terms = model.cost_terms(analysis, window, background)
        state = adaptation.update(state, base_window, terms, first, trajectory)
    return {
        "analysis": analysis,
        "info": info,
        "first": first,
        "trajectory": trajectory,
        "cost": cost,
        "grad_norm": grad_norm,
        "forecast": model.forecast(analysis, trajectory, shift),
        "adaptation": state,
    }


def _result(window: ObservationSet, out: dict, new: int | None = None) -> WindowResult:
    """The host-side result; `new`: only the window's last `new` times are
    reported (a sliding window's times not reported by an earlier window)."""
    out = jax.tree.map(np.asarray, out)
    info = out["info"]
    steps = int(info.steps)
    cost, grad_norm = out["cost"], out["grad_norm"]
    history = (cost, grad_norm)
    if info.cost is not None:
        history = (info.cost[: steps + 1], info.grad_norm[: steps + 1])
    window = jax.tree.map(np.asarray, window)
    assimilated = int(window.mask.sum())
    first, trajectory = out["first"], out["trajectory"]
    spread = out.get("spread")
    if new is not None and new < window.n_times:
        keep = slice(window.n_times - new, None)
        first, trajectory = first[keep], trajectory[keep]
        window = _times(window, keep)
    diagnostics = innovation_statistics(
        observations=window.values,
        forecast=window.operator(first),
        error_std=window.error_std,
        mask=window.mask,
    )
    diagnostics = {f"innovation_{key}": v for key, v in diagnostics.items()}
    # 2 J(x_a) / p: the chi-square of the innovations against HBH^T + R, which is
    # 1 on average when B and R are right (Talagrand, ECMWF 1999).
    diagnostics["chi2_normalised_analysis"] = 2 * float(cost[1]) / max(assimilated, 1)
    if "chi2" in out:  # an ensemble filter: d^T (H P_f H^T + R)^-1 d, same mean
        diagnostics["chi2_normalised_analysis"] = float(out["chi2"]) / max(
            assimilated, 1
        )
    state = out["adaptation"]
    if state is not None:
        diagnostics["background_error_scale"] = float(
            np.sqrt(state.background_variance)
        )
        diagnostics["observation_error_scale"] = float(
            np.sqrt(state.observation_variance)
        )
    if info.from_guess is not None:  # a refinement: 1 from its guess, 0 cold
        diagnostics["refinement_from_guess"] = int(info.from_guess)
    if window.truth is not None:
        diagnostics["rmse_truth_analysis"] = rmse(
            estimate=trajectory, reference=window.truth
        )
        diagnostics["rmse_truth_background"] = rmse(
            estimate=first, reference=window.truth
        )
    return WindowResult(
        times=np.asarray(window.times),
        analysis=trajectory,
        background=first,
        theta=out["analysis"].theta,
        steps=steps,
        outcome=outcome_name(info.outcome),
        cost=cost,
        grad_norm=grad_norm,
        cost_history=history[0],
        grad_norm_history=history[1],
        diagnostics=diagnostics,
        window=window,
        spread=spread,
    )


def _times(window: ObservationSet, keep: slice) -> ObservationSet:
    """The window at the times `keep` (every per-time field sliced)."""
    fields = ("values", "mask", "error_std", "times", "truth", "withheld")
    return dataclasses.replace(
        window,
        **{
            name: getattr(window, name)[keep]
            for name in fields
            if getattr(window, name) is not None
        },
    )


def _newest(window: ObservationSet, new: int) -> ObservationSet:
    """The window with only its last `new` times' observations assimilated (the
    earlier ones were assimilated by an earlier, overlapping window: each
    observation is used once); withheld ones stay for scoring."""
    recent = jnp.arange(window.n_times) >= window.n_times - new
    recent = recent.reshape((-1,) + (1,) * (window.mask.ndim - 1))
    withheld = None if window.withheld is None else window.withheld & recent
    return dataclasses.replace(window, mask=window.mask & recent, withheld=withheld)


def cycle(
    analyser: AbstractAnalyser,
    problem: WindowProblem,
    windows: Iterable[ObservationSet],
    background: Array,
    *,
    cycle_parameters: bool = True,
    shift: int | None = None,
    adaptation: InnovationAdaptation | None = None,
) -> Iterator[WindowResult]:
    """Assimilate consecutive windows, each background the previous forecast; yield
    each window's result when it is done (windows are read as they are needed, so
    a stream of them from disk is never all in memory).

    The first window starts from `background`; each later window's background is
    the analysis at the previous window's last observation time advanced one
    observation interval by the model with the estimated parameters
    (`WindowProblem.forecast`). With `cycle_parameters`, the estimated parameters
    also become the next window's parameter prior mean, so that the information in
    past windows carries over. Each window is one compiled call
    (`analyse_window`), compiled once for all windows of the same shape.

    **Arguments:**

    - `analyser`: any `AbstractAnalyser` (`Variational`, a trained `UnrolledVar` or
      `BilevelVar`, ...).
    - `problem`: the window problem.
    - `windows`: `ObservationSet`s of consecutive windows: non-overlapping, one
      observation interval apart (e.g. from `iter_windows`), or with `shift`
      overlapping windows that start `shift` observation times apart.
    - `background`: the first window's background state.
    - `shift`: sliding windows (4D-Var as in the literature, e.g. DAPPER's `Var4D`
      and the iterative ensemble Kalman smoother): each window's background is
      the previous analysis `shift` observation times after its start, and only
      the observations not in the previous window (its last `shift` times) are
      assimilated; the first window assimilates all of its own. Results report
      the times no earlier window reported: the first window's, then each
      window's last `shift` (the filtering analysis at the newest times).
    - `adaptation`: estimate the background- (and observation-) error scales
      while cycling (`InnovationAdaptation`).

    **Yields:** one `WindowResult` per window.
    """
    if shift is not None and shift < 1:
        raise ValueError(f"shift must be at least 1, got {shift}")
    analyse = eqx.filter_jit(analyse_window)
    state = None if adaptation is None else adaptation.init()
    ensemble = isinstance(analyser, AbstractEnsembleAnalyser)
    if ensemble != isinstance(background, Ensemble):
        raise ValueError(
            "an ensemble analyser needs an assim.Ensemble as background (and only "
            f"it does); got {type(background).__name__} for "
            f"{type(analyser).__name__}"
        )
    # A strongly typed copy: a weakly typed first background (`jnp.full(shape,
    # 0.5)`) would compile the window a second time for the forecasts.
    if ensemble:
        background = eqx.tree_at(
            lambda e: e.members, background, jnp.asarray(background.members)
        )
    else:
        background = jnp.asarray(np.asarray(background))
    done = 0
    for window in windows:
        new = None
        if shift is not None and done:
            if shift > window.n_times:
                raise ValueError(
                    f"shift {shift} is longer than the window ({window.n_times} times)"
                )
            new = shift
            window = _newest(window, shift)
        out = analyse(analyser, problem, window, background, adaptation, state, shift)
        yield _result(window, out, new)
        check_forecast(out["forecast"], done)
        done += 1
        background, state = out["forecast"], out["adaptation"]
        theta = out["analysis"].theta
        if cycle_parameters and problem.estimates_parameters and theta is not None:
            problem = eqx.tree_at(lambda p: p.parameter_background, problem, theta)
    if not done:
        raise ValueError("cycle: no observation window to assimilate")


def assimilate(
    analyser: AbstractAnalyser,
    problem: WindowProblem,
    windows: Iterable[ObservationSet],
    background: Array | Callable[[ObservationSet], Array],
    *,
    batch_size: int = 16,
    mesh=None,
) -> Iterator[WindowResult]:
    """Assimilate independent windows, each from the same `background` (or from
    `background(window)`, e.g. `lambda w: obs_mean_background(w, shape)`: each from
    its own observations' mean) and the problem's parameter prior (no cycling),
    `batch_size` windows at a time: each
    batch vmapped and split over the devices of `mesh` (`assim.batch_mesh`; default
    every device), padded where the windows do not divide across them. Windows are
    read as they are needed; results come in the windows' order.

    **Yields:** one `WindowResult` per window.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(analyser, AbstractEnsembleAnalyser):
        raise ValueError(
            f"{type(analyser).__name__} is an ensemble method: its windows are "
            "cycled (assim.cycle; method.cycle=true), not independent"
        )
    windows = iter(windows)
    done = 0
    while chunk := list(itertools.islice(windows, batch_size)):
        if callable(background):
            backgrounds = [background(window) for window in chunk]
        else:
            backgrounds = [background] * len(chunk)
        batch = Batch.stack(chunk, backgrounds)
        outputs = map_windows(
            lambda model, w: analyse_window(*model, w.obs, w.background),
            (analyser, problem),
            batch,
            mesh=mesh,
        )
        for i, window in enumerate(chunk):
            yield _result(window, jax.tree.map(lambda a, i=i: a[i], outputs))
        done += len(chunk)
    if not done:
        raise ValueError("assimilate: no observation window to assimilate")
