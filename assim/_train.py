"""Training unrolled networks: optax optimiser and schedule, jitted vmapped steps,
validation, a JSON-lines metrics log, atomic checkpoints with exact resume, and a
stop on a non-finite loss that keeps the last good state."""

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import PyTree

from ._analyser import AbstractAnalyser
from ._batch import Batch
from ._losses import Masking, Term, WeightedLoss, batch_loss, refine_analysis
from ._parallel import (
    batch_mesh,
    batch_sharding,
    check_divides,
    replicate,
    shard_batch,
)
from ._problem import WindowProblem
from ._stream import WindowStream
from ._unrolled import AbstractWindowNet


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss or gradient, or a failed solve; the last
    good state is in the checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How to train.

    - `steps`, `batch_size`: optimiser steps and windows per step.
    - `learning_rate`, `warmup_steps`, `clip_norm`: Adam with linear warm-up and
      cosine decay to `learning_rate * final_fraction`, gradients clipped by global
      norm.
    - `parameter_learning_rate`: the same schedule's peak for the learned physical
      parameters (`theta`; default `learning_rate`). Adam moves each coordinate by
      about the learning rate per step, so a whitened parameter field that must
      travel O(1) from its prior needs a larger rate than the network's weights.
    - `loss`: a `WeightedLoss` (default: the masking loss alone). With a refined
      cost loss (`Cost(refine > 0)`) `train` keeps one refined analysis per
      training window, started at the network's output and refined further at
      each step that draws the window (warm starts: the iterations add up across
      steps); it is checkpointed with the parameters, so a resumed run continues
      exactly.
    - `cycle_every`: with `n > 0`, the windows' backgrounds are those cycling
      gives: before training and then every `n` steps, the network (as trained so
      far) analyses the training and validation windows in time order, each from
      the forecast of its analysis of the window before (`cycled_backgrounds`),
      so that it learns from the backgrounds `assim-run` feeds it when cycling
      rather than only from the given ones (the observation means). Needs the
      windows in memory (not a `WindowStream`); the backgrounds are
      checkpointed, so a resumed run continues exactly.
    - `validate_every`, `checkpoint_every`: in steps (0: only at the end). A
      checkpoint is written once its state's loss (at the next step) is known
      finite, and not over one whose loss was much lower (a diverging run).
    - `seed`: batches and masks are drawn from `fold_in(seed, step)`, so that a
      resumed run draws what the uninterrupted run would have.
    - `keep_best`: the trained network (returned, and the checkpoint written at
      the end) is the state of the lowest validation loss, not the last (early
      stopping; needs validation windows and `validate_every`). A resumed run
      continues from that state.
    - `patience`: with `n > 0`, training stops once the validation loss has not
      improved for `n` validations (0: runs all `steps`).
    """

    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 3e-3
    parameter_learning_rate: float | None = None
    warmup_steps: int = 10
    final_fraction: float = 0.1
    clip_norm: float = 1.0
    loss: WeightedLoss = dataclasses.field(
        default_factory=lambda: WeightedLoss({"masking": Term(Masking())})
    )
    validate_every: int = 50
    checkpoint_every: int = 50
    cycle_every: int = 0
    seed: int = 0
    keep_best: bool = False
    patience: int = 0

    def __post_init__(self):
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.cycle_every < 0:
            raise ValueError(f"cycle_every must be >= 0, got {self.cycle_every}")
        rates = (self.learning_rate, self.parameter_learning_rate or 1.0)
        if not all(rate > 0 for rate in rates):
            raise ValueError(f"learning rates must be positive, got {rates}")
        if not isinstance(self.loss, WeightedLoss):
            raise TypeError(
                f"loss must be a WeightedLoss, got {type(self.loss).__name__}"
            )

    def optimizer(self) -> optax.GradientTransformation:
        def adam(peak):
            return optax.adam(
                optax.warmup_cosine_decay_schedule(
                    0.0,
                    peak,
                    max(self.warmup_steps, 1),
                    max(self.steps, self.warmup_steps + 1),
                    peak * self.final_fraction,
                )
            )

        update = adam(self.learning_rate)
        if self.parameter_learning_rate is not None:
            update = optax.multi_transform(
                {"network": update, "parameters": adam(self.parameter_learning_rate)},
                _parameter_labels,
            )
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), update)


def _parameter_labels(params) -> PyTree[str]:
    """ "parameters" on the network's `theta` leaves, "network" elsewhere."""
    labels = jax.tree.map(lambda _: "network", params)
    if getattr(params, "theta", None) is None:
        return labels
    return eqx.tree_at(
        lambda p: p.theta, labels, jax.tree.map(lambda _: "parameters", params.theta)
    )


class TrainState(eqx.Module):
    """The trainable leaves, the optimiser state and the step count; `analyses`:
    the refined cost loss's warm-started analyses, one per training window (`None`
    without it); `backgrounds`: with `cycle_every`, the cycled backgrounds of the
    training and validation windows in time order (`None` without it)."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array
    analyses: jax.Array | None = None
    backgrounds: jax.Array | None = None


def _split(net: AbstractWindowNet):
    return eqx.partition(net, net.trainable())


def init_state(net: AbstractWindowNet, settings: TrainSettings) -> TrainState:
    params, _ = _split(net)
    opt_state = settings.optimizer().init(eqx.filter(params, eqx.is_inexact_array))
    return TrainState(params, opt_state, jnp.asarray(0))


def _select(batch: Batch, index) -> Batch:
    return jax.tree.map(lambda a: a[index], batch)


def _batch_key(settings: TrainSettings, step):
    return jax.random.fold_in(jax.random.PRNGKey(settings.seed), step)


def _draw(settings: TrainSettings, step, n: int):
    """`(batch indices, masking key)` of a step: a function of the seed and the step
    only, so that a resumed run draws what the uninterrupted run would have."""
    key_batch, key_loss = jax.random.split(_batch_key(settings, step))
    index = jax.random.choice(
        key_batch, n, (settings.batch_size,), replace=n < settings.batch_size
    )
    return index, key_loss


def _warm_refined(settings: TrainSettings) -> bool:
    """Whether training keeps warm-started refined analyses (the cost loss with
    `cost_refine > 0`)."""
    return settings.loss.refined_cost() is not None


def _refine_batch(state: TrainState, static, problem, batch: Batch, settings, index):
    """The batch with its windows' stored analyses refined by the cost loss's
    Gauss-Newton iterations at the current parameters, and the updated store."""
    if state.analyses is None or index is None:
        return batch, state.analyses
    net = eqx.combine(state.params, static)
    cost = settings.loss.refined_cost()
    analyses = jax.vmap(
        lambda o, b, x: refine_analysis(
            net, problem, o, b, x, steps=cost.refine, cg_steps=cost.refine_cg
        )
    )(batch.obs, batch.background, state.analyses[index])
    batch = eqx.tree_at(lambda b: b.analysis, batch, analyses, is_leaf=_is_none)
    return batch, state.analyses.at[index].set(analyses)


def _is_none(x):
    return x is None


def _update(
    state: TrainState,
    static,
    problem: WindowProblem,
    batch: Batch,
    key,
    settings: TrainSettings,
    windows,
    index=None,
):
    batch, analyses = _refine_batch(state, static, problem, batch, settings, index)

    def loss(params):
        net = eqx.combine(params, static)
        return batch_loss(settings.loss, net, problem, batch, key=key, windows=windows)

    (value, terms), grads = eqx.filter_value_and_grad(loss, has_aux=True)(state.params)
    updates, opt_state = settings.optimizer().update(
        grads, state.opt_state, eqx.filter(state.params, eqx.is_inexact_array)
    )
    params = eqx.apply_updates(state.params, updates)
    finite = jnp.isfinite(value) & jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    new = TrainState(params, opt_state, state.step + 1, analyses, state.backgrounds)
    return new, value, terms, finite


@eqx.filter_jit
def _train_step(
    state: TrainState,
    static,
    problem: WindowProblem,
    data: Batch,
    settings: TrainSettings,
    sharding,
):
    index, key = _draw(settings, state.step, data.size)
    # The drawn windows split over the devices (data parallelism); the parameters
    # and the data they are drawn from are replicated, so XLA inserts the
    # gradient's all-reduce.
    batch = jax.lax.with_sharding_constraint(_select(data, index), sharding)
    return _update(state, static, problem, batch, key, settings, data.size, index)


@eqx.filter_jit
def _streamed_step(
    state: TrainState,
    static,
    problem: WindowProblem,
    batch: Batch,
    settings: TrainSettings,
    windows: int,
):
    """A step on a batch read from a `WindowStream` (already split over devices);
    `windows`: the stream's size. A refined cost loss refines each window from the
    network's output (no store of analyses for an archive larger than memory)."""
    _, key = _draw(settings, state.step, 1)
    return _update(state, static, problem, batch, key, settings, windows)


def _stream_batches(stream: WindowStream, settings: TrainSettings, start: int):
    """The batches of steps `start`, ..., read ahead on a host thread: the same
    windows as the in-memory path draws (the same keys, on the host)."""
    draws = (
        np.asarray(_draw(settings, step, stream.size)[0])
        for step in range(start, settings.steps)
    )
    return stream.batches(draws)


@eqx.filter_jit
def _evaluate(net, problem, data: Batch, settings: TrainSettings):
    # A fixed key: the validation masks are the same at every evaluation.
    key = jax.random.PRNGKey(settings.seed + 1)
    value, terms = batch_loss(settings.loss, net, problem, data, key=key)
    return {"loss": value, **terms}


def evaluate(
    net: AbstractWindowNet,
    problem: WindowProblem,
    data: Batch,
    settings: TrainSettings,
) -> dict:
    """Validation losses (the training loss terms on `data`, fixed masks)."""
    return {k: float(v) for k, v in _evaluate(net, problem, data, settings).items()}


def save_checkpoint(path, state: TrainState, header: dict):
    """Write `header` (one JSON line, with the SHA-256 of the leaves) and the
    state's leaves (`eqx.tree_serialise_leaves`) atomically. In a multi-host run
    the first process writes (the state is replicated)."""
    if jax.process_index() != 0:
        return
    state = jax.tree.map(_host_copy, state)
    leaves = io.BytesIO()
    eqx.tree_serialise_leaves(leaves, state)
    leaves = leaves.getvalue()
    header = {**header, "sha256": hashlib.sha256(leaves).hexdigest()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(header) + "\n").encode())
            f.write(leaves)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _host_copy(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0))  # replicated: any copy
    return leaf


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_header(path) -> dict:
    """The JSON header of a checkpoint."""
    return _read(path)[0]


def _read(path) -> tuple[dict, bytes]:
    """`(header, leaves' bytes)` of a checkpoint, the leaves checked against the
    header's checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        first, leaves = f.readline(), f.read()
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not an assim checkpoint (bad header)") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not an assim checkpoint (bad header)")
    digest = header.get("sha256")
    if digest is not None and hashlib.sha256(leaves).hexdigest() != digest:
        raise ValueError(
            f"{path} is corrupt: its contents do not match the checksum in its "
            "header (truncated or modified)"
        )
    return header, leaves


def load_checkpoint(path, like: TrainState) -> tuple[TrainState, dict]:
    """Read a checkpoint into the structure of `like` (after checking it)."""
    header, leaves = _read(path)
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(leaves), like)
    except Exception as e:
        raise ValueError(
            f"{path} does not fit this network and training settings (a different "
            f"network, loss or cycling than the one that wrote it?): "
            f"{type(e).__name__}"
        ) from e
    return state, header


def network(net: AbstractWindowNet, state: TrainState) -> AbstractWindowNet:
    """The network with the state's trained leaves."""
    return eqx.combine(state.params, _split(net)[1])


def train(
    net: AbstractWindowNet,
    problem: WindowProblem,
    data: Batch,
    settings: TrainSettings,
    *,
    validation: Batch | None = None,
    checkpoint: str | Path | None = None,
    header: dict | None = None,
    resume: bool = False,
    log: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_validation: Callable[[int, AbstractWindowNet, dict], None] | None = None,
    mesh: Mesh | None = None,
    window_numbers: tuple | None = None,
) -> tuple[AbstractWindowNet, list[dict]]:
    """Train `net` on the windows of `data`.

    **Arguments:**

    - `net`: the untrained network (its skeleton; the trained leaves come from the
      checkpoint when resuming).
    - `problem`: the window problem (simulator, covariances, parameter prior) the
      network analyses; not trained.
    - `data`, `validation`: batches of all training / validation windows; each step
      draws `batch_size` windows from `data`. `data` may be a `WindowStream` over
      an archive larger than memory: each step's windows (the same draws) are then
      read from disk on a host thread while the previous step computes.
    - `checkpoint`: file written every `checkpoint_every` steps, at the end and on
      a stop; `header` (JSON-able, e.g. the config that rebuilds `net`) is stored
      in it.
    - `resume`: continue from `checkpoint` (same draws as an uninterrupted run).
    - `log`: JSON-lines metrics file (appended to when resuming; entries after the
      checkpoint's step are dropped).
    - `on_step`: called as `on_step(step, record)` after every step (progress bars).
    - `on_validation`: called as `on_validation(step, network, scores)` after each
      validation, with the network as trained so far (e.g. to score it on a test
      set).
    - `mesh`: the devices that share each batch (`assim.batch_mesh`; default: every
      device of every process). `batch_size` must divide across them. One device
      or many, the steps are the same up to floating-point summation order.
    - `window_numbers`: with `settings.cycle_every`, `(training, validation)`: each
      window's position in time (its number in the file, consecutive windows
      consecutive numbers); default: `data`'s windows then `validation`'s, one
      after the other. Cycling restarts from a window's own background after a
      gap.

    **Returns:** `(trained network, records)`.

    **Raises:** `TrainingStopped` on a non-finite loss or gradient or a failed solve,
    after saving the last good state.
    """
    mesh = batch_mesh() if mesh is None else mesh
    check_divides(settings.batch_size, mesh, "batch_size")
    # No raising check inside the training programs (JAX's persistent compilation
    # cache stores no program holding one, so every run would compile its steps
    # again): a rollout that blows up or a failed stage solve gives a non-finite
    # loss, which stops the run below, on the host.
    problem = problem.without_raising()
    sharding = batch_sharding(mesh)
    state = init_state(net, settings)
    header = dict(header or {})
    timeline = None
    if settings.cycle_every:
        if isinstance(data, WindowStream):
            raise ValueError(
                "cycle_every needs the training windows in memory, not streamed "
                "from disk (data.stream=false)"
            )
        timeline = _timeline(data, validation, window_numbers)
        backgrounds = timeline.windows.background
        if not resume:
            backgrounds, _ = _cycled(net, problem, timeline.windows, timeline.follows)
        state = eqx.tree_at(
            lambda s: s.backgrounds, state, backgrounds, is_leaf=_is_none
        )
        data = timeline.with_backgrounds(data, backgrounds, "train")
    warm = _warm_refined(settings) and not isinstance(data, WindowStream)
    if warm:  # the network's outputs start the refined analyses
        analyses = (
            _outputs(net, problem, data)
            if not resume
            else _outputs_like(net, problem, data)
        )
        state = eqx.tree_at(lambda s: s.analyses, state, analyses, is_leaf=_is_none)
    if resume:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"resume=true but no checkpoint at {checkpoint}")
        state, _ = load_checkpoint(checkpoint, state)
    records = _read_log(log, int(state.step)) if resume else []
    if log is not None:
        _write_log(log, records)
    state = replicate(state, mesh)
    problem = replicate(problem, mesh)
    _, static = _split(net)
    batches = None
    if isinstance(data, WindowStream):
        batches = _stream_batches(data, settings, int(state.step))

        def step_fn(state):
            batch = shard_batch(next(batches), mesh)
            return _streamed_step(state, static, problem, batch, settings, data.size)

    else:
        data = replicate(data, mesh)

        def step_fn(state):
            batch = data
            if timeline is not None:  # the current cycled backgrounds
                batch = timeline.with_backgrounds(data, state.backgrounds, "train")
            return _train_step(state, static, problem, batch, settings, sharding)

    def validation_data(state):
        if timeline is None or validation is None:
            return validation
        return timeline.with_backgrounds(validation, state.backgrounds, "validation")

    # The last state whose loss was finite (evaluated at its own parameters), and
    # the losses of the states evaluated so far. A periodic checkpoint is written
    # once its state's loss is known finite (`pending` until then), a stop writes
    # the last good state; neither writes over a checkpoint of this run that is
    # newer or whose loss was much lower (a diverging run).
    losses: dict[int, float] = {}
    saved = {"step": int(state.step) if resume else None}
    good = pending = None

    def save(state):
        if checkpoint is not None:
            save_checkpoint(checkpoint, state, {**header, "step": int(state.step)})
            saved["step"] = int(state.step)

    def stop(reason: str, cause=None):
        kept = _worth_saving(good, saved["step"], losses)
        if kept is not None and checkpoint is not None:
            save(kept)
        if checkpoint is None:
            where = "no checkpoint file was given"
        elif saved["step"] is None:
            where = f"no state of this run had a finite loss; {checkpoint} not written"
        else:
            where = f"the last good state (step {saved['step']}) is in {checkpoint}"
        raise TrainingStopped(f"{reason}; {where}") from cause

    def write(record):
        records.append(record)
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")

    best = {"loss": np.inf, "state": None, "step": None, "since": 0}

    def remember(state, scores) -> bool:
        """Track the lowest validation loss; whether to stop (patience spent)."""
        if scores["loss"] < best["loss"]:
            best.update(loss=scores["loss"], step=int(state.step), since=0)
            if settings.keep_best:
                best["state"] = state
        else:
            best["since"] += 1
        return bool(settings.patience) and best["since"] >= settings.patience

    try:
        while int(state.step) < settings.steps:
            step = int(state.step)
            cycled = None
            if timeline is not None and step and step % settings.cycle_every == 0:
                backgrounds, linked = _cycled(
                    network(net, state), problem, timeline.windows, timeline.follows
                )
                state = eqx.tree_at(
                    lambda s: s.backgrounds, state, replicate(backgrounds, mesh)
                )
                cycled = int(np.sum(linked))
            try:
                new, value, terms, finite = step_fn(state)
                finite = bool(finite)
            except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError) as e:
                stop(f"step {step + 1}: a solve failed ({error_summary(e)})", e)
            if not finite:
                loss = float(value)
                stop(
                    f"step {step + 1}: non-finite loss or gradient (loss {loss}): a "
                    "rollout blew up, an implicit stage solve failed or the "
                    "parameters diverged"
                )
            losses[step] = float(value)
            good = state
            if pending is not None and int(pending.step) == step:
                # a checkpoint is written once its state's loss is known finite
                if _worth_saving(good, saved["step"], losses) is not None:
                    save(good)
                pending = None
            if not _finite_leaves(new.params):
                stop(f"step {step + 1}: the update made the parameters non-finite")
            state = new
            record = {"step": step + 1, "loss": float(value)}
            record.update({k: float(v) for k, v in terms.items()})
            if cycled is not None:  # windows whose background is a cycled forecast
                record["cycled_windows"] = cycled
            done = int(state.step) == settings.steps
            every = settings.validate_every
            if validation is not None and (done or (every and (step + 1) % every == 0)):
                scores = evaluate(
                    network(net, state), problem, validation_data(state), settings
                )
                if not all(np.isfinite(v) for v in scores.values()):
                    stop(
                        f"step {step + 1}: non-finite validation loss ({scores}): "
                        "the network's analyses of the validation windows blew up"
                    )
                record["validation"] = scores
                if on_validation is not None:
                    on_validation(step + 1, network(net, state), scores)
                if remember(state, scores):
                    record["stopped_early"] = True
                    done = True
                record["validation_best_step"] = best["step"]
            if done and best["state"] is not None:
                state = best["state"]  # keep_best: the best validated state
            write(record)
            if on_step is not None:
                on_step(step + 1, record)
            every = settings.checkpoint_every
            if done:
                save(state)
                break
            elif every and (step + 1) % every == 0:
                pending = state
    finally:
        if batches is not None:
            batches.close()  # stops the reading thread
    return network(net, state), records


def cycled_backgrounds(
    net: AbstractAnalyser, problem: WindowProblem, windows: Batch, follows=None
) -> jax.Array:
    """The backgrounds that cycling gives the windows of `windows` (in time order):
    each window's background is the forecast of `net`'s analysis of the window
    before it, where `follows[k]` says that window `k` directly follows window
    `k - 1` (default: all do); the first window, one after a gap and one whose
    forecast is not finite (an analysis the model cannot integrate) keep their own
    (`windows.background`). One compiled scan over the windows."""
    if follows is None:
        follows = np.arange(windows.size) > 0
    return _cycled(net, problem, windows, follows)[0]


@eqx.filter_jit
def _cycled(net, problem: WindowProblem, windows: Batch, follows):
    """`(backgrounds, whether each is a cycled forecast)`."""
    problem = problem.tolerating_blow_up()
    model = net.model_problem(problem)
    n = windows.obs.values.shape[1]

    def step(forecast, k):
        window = jax.tree.map(lambda a: a[k], windows.obs)
        linked = jnp.asarray(follows)[k] & jnp.all(jnp.isfinite(forecast))
        background = jnp.where(linked, forecast, windows.background[k])
        analysis, _ = net(problem, window, background)
        forecast = model.forecast(analysis, model.trajectory(analysis, n))
        return forecast, (background, linked)

    _, out = jax.lax.scan(step, windows.background[0], jnp.arange(windows.size))
    return out


@dataclasses.dataclass(frozen=True)
class _Timeline:
    """The training and validation windows in time order (`windows`), whether each
    directly follows the one before (`follows`), and the rows of the training and
    validation windows in it."""

    windows: Batch
    follows: np.ndarray
    rows: dict

    def with_backgrounds(self, batch: Batch, backgrounds, part: str) -> Batch:
        """`batch` (the training or validation windows) with their backgrounds
        taken from the timeline's `backgrounds`."""
        return eqx.tree_at(lambda b: b.background, batch, backgrounds[self.rows[part]])


def _timeline(data: Batch, validation: Batch | None, numbers) -> _Timeline:
    parts = [data] if validation is None else [data, validation]
    both = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
    if numbers is None:
        numbers = np.arange(both.size)
    else:
        numbers = np.concatenate([np.asarray(n, int) for n in numbers if n is not None])
    if numbers.shape != (both.size,) or len(set(numbers.tolist())) != both.size:
        raise ValueError(
            f"window_numbers must number the {both.size} training and validation "
            f"windows once each, got {numbers.tolist()}"
        )
    order = np.argsort(numbers, kind="stable")
    rows = np.argsort(order)
    follows = np.concatenate([[False], np.diff(numbers[order]) == 1])
    return _Timeline(
        _select(both, order),
        follows,
        {"train": rows[: data.size], "validation": rows[data.size :]},
    )


def _finite_leaves(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


# A stop keeps a checkpoint of the run over a later state whose loss rose by more
# than this factor of the checkpointed state's: the run was diverging.
_DIVERGED = 10.0


def _worth_saving(good, saved_step, losses) -> "TrainState | None":
    """`good` (a state whose loss was finite) if it may replace the checkpoint:
    unless the checkpoint already holds it or a later one (`saved_step`), or
    holds an earlier state whose loss was known and much lower (a diverging
    run)."""
    if good is None:
        return None
    step = int(good.step)
    if saved_step is not None:
        if step <= saved_step:
            return None
        before = losses.get(saved_step)
        if before is not None and losses[step] > before + _DIVERGED * abs(before):
            return None
    return good


@eqx.filter_jit
def _outputs(net: AbstractWindowNet, problem: WindowProblem, data: Batch):
    return jax.vmap(lambda o, b: net(problem, o, b)[0].initial_state)(
        data.obs, data.background
    )


def _outputs_like(net: AbstractWindowNet, problem: WindowProblem, data: Batch):
    """Zeros shaped as `_outputs` (a structure to load a checkpoint into)."""
    shape = eqx.filter_eval_shape(_outputs, net, problem, data)
    return jnp.zeros(shape.shape, shape.dtype)


def error_summary(error: BaseException) -> str:
    """The line of an error that says what happened (equinox runtime errors put
    their message after the stack banners)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "EquinoxRuntimeError:" in line:
            return line.split("EquinoxRuntimeError:", 1)[1].strip()
    banners = ("Above is the stack", "Below is the stack", "-----")
    lines = [line for line in lines if not line.startswith(banners)]
    return lines[0] if lines else repr(error)


def _read_log(log, upto: int) -> list[dict]:
    if log is None or not Path(log).is_file():
        return []
    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line]
    return [r for r in records if r["step"] <= upto]


def _write_log(log, records):
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    Path(log).write_text("".join(json.dumps(r) + "\n" for r in records))
