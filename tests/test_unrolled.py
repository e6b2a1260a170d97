"""Unrolled variational networks, bilevel (implicit) hypergradients, their losses and
their training (small Lorenz-96 windows: 40 variables, 3 observation times 5 steps
apart, 3 layers)."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from helpers import TIGHT, l96_twin_windows, tree_allclose

import simulators as sim
from assim import (
    Analysis,
    BilevelVar,
    Control,
    Cost,
    Evidence,
    Masking,
    NeuralCorrection,
    Residual,
    ReverseImplicitAdjoint,
    Term,
    TrainingStopped,
    TrainSettings,
    UnrolledVar,
    Variational,
    WeightedLoss,
    WindowProblem,
    analyse_window,
    batch_loss,
    cycle,
    cycled_backgrounds,
    incremental,
    train,
    windows_batch,
)
from assim._train import init_state, load_checkpoint

T, INTERVAL = 3, 5


@pytest.fixture(scope="module")
def l96_windows():
    return l96_twin_windows(8, T, INTERVAL, spinup=500)


def set_forcing(simulator, theta):
    return eqx.tree_at(lambda s: s.model.forcing, simulator, 8.0 * jnp.exp(theta))


def make_problem(l96, B, *, forcing=False, **options):
    """The windows' problem; `forcing`: the forcing is an unknown parameter
    (`8 exp(theta)`, prior N(0, 1))."""
    if forcing:
        options.update(
            set_parameters=set_forcing,
            parameter_background=jnp.asarray(0.0),
            parameter_std=1.0,
        )
    return WindowProblem(l96, B, INTERVAL, **options)


def make_net(l96, B, key, *, problem_options=None, **options):
    """`(net, problem)`: a 3-layer network; with `theta` in `options` it learns the
    forcing."""
    problem = make_problem(
        l96, B, forcing="theta" in options, **(problem_options or {})
    )
    net = UnrolledVar(
        l96.model.grid,
        3,
        n_times=T,
        step=0.1,
        scale=3.6,
        width=4,
        depth=2,
        key=key,
        **options,
    )
    return net, problem


def trajectory(net, problem, obs, xb):
    return net.trajectory(problem, obs, xb)


def test_plain_layers_are_preconditioned_gradient_descent(l96_windows, getkey):
    """With no learned module, the network is K steps of
    `x <- x - alpha (lambda (x - x_b) + B grad J_o(x))` (hand-written here)."""
    l96, B, windows = l96_windows
    obs, xb = windows[0], jnp.full(40, 2.0)
    net, problem = make_net(l96, B, getkey(), regularisation=0.5)

    def jo(x):
        states = l96.rollout(x, (T - 1) * INTERVAL)[::INTERVAL]
        r = jnp.where(obs.mask, states - obs.values, 0.0)
        return 0.5 * jnp.sum(r**2)

    x = xb
    for _ in range(3):
        g = jax.grad(jo)(x)
        x = x - 0.1 * (0.5 * (x - xb) + B.sqrt(B.sqrt_transpose(g)))
    analysis, info = net(problem, obs, xb)
    assert tree_allclose(analysis.initial_state, x, rtol=1e-10, atol=1e-10)
    assert analysis.w is None and int(info.steps) == 3


def test_checkpointed_layers_give_the_same_gradient(l96_windows, getkey):
    """Binomial checkpointing of the layer loop changes memory, not the result."""
    l96, B, windows = l96_windows
    batch = windows_batch(windows[:2], (40,))
    key = getkey()
    options = dict(momentum=True, prior="proximal", gradient_solver=True)
    grads = []
    for checkpoints in (None, 1):
        net, problem = make_net(l96, B, key, checkpoints=checkpoints, **options)
        params, static = eqx.partition(net, net.trainable())
        grads.append(
            eqx.filter_grad(
                lambda p, static=static, problem=problem: batch_loss(
                    WeightedLoss.of(supervised=1.0),
                    eqx.combine(p, static),
                    problem,
                    batch,
                    key=key,
                )[0]
            )(params)
        )
    assert tree_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scheme", ["rk4", "newton-krylov"])
def test_unrolled_gradient_matches_finite_differences(l96_windows, getkey, scheme):
    """Backpropagation through the layers (and through the adjoint inside them) in
    float64 against central differences, for the learned forcing and a step size;
    also through a fully implicit scheme (implicit midpoint), whose Newton-Krylov
    stages are differentiated implicitly: reverse over reverse of the implicit
    function theorem, each derivative one Krylov solve; there also for the weights
    of a model-error correction inside the implicit stages."""
    l96, B, windows = l96_windows
    correction = None
    if scheme == "newton-krylov":
        correction = NeuralCorrection(
            l96.model.grid, 4, 2, 3, scale=3.6, rate=0.5, key=getkey()
        )
        l96 = sim.Simulator(l96.model, sim.ImplicitMidpoint(TIGHT), l96.dt)
    obs, xb = windows[1], jnp.full(40, 2.0)
    net, problem = make_net(
        l96,
        B,
        getkey(),
        momentum=True,
        theta=jnp.asarray(0.0),
        correction=correction,
    )

    @jax.jit
    def loss(theta, log_step):
        n = eqx.tree_at(lambda m: (m.theta, m.log_step), net, (theta, log_step))
        return jnp.mean((trajectory(n, problem, obs, xb) - obs.truth) ** 2)

    theta, log_step = jnp.asarray(0.01), net.log_step
    g_theta, g_step = jax.jit(jax.grad(loss, argnums=(0, 1)))(theta, log_step)
    eps = 1e-6
    fd_theta = (loss(theta + eps, log_step) - loss(theta - eps, log_step)) / (2 * eps)
    direction = jnp.asarray([1.0, -0.5, 0.25])
    fd_step = (
        loss(theta, log_step + eps * direction)
        - loss(theta, log_step - eps * direction)
    ) / (2 * eps)
    # Central differences: O(eps^2) truncation, O(1e-16 / eps) round-off.
    np.testing.assert_allclose(g_theta, fd_theta, rtol=1e-6)
    np.testing.assert_allclose(jnp.dot(g_step, direction), fd_step, rtol=1e-6)
    if scheme != "newton-krylov":
        return
    weights, rest = eqx.partition(net.correction, eqx.is_inexact_array)

    @jax.jit
    def correction_loss(w):
        c = eqx.combine(w, rest)
        n = eqx.tree_at(lambda m: m.correction, net, c)
        return jnp.mean((trajectory(n, problem, obs, xb) - obs.truth) ** 2)

    g = jax.jit(jax.grad(correction_loss))(weights)
    d = jax.tree.map(lambda w: jax.random.normal(getkey(), w.shape, w.dtype), weights)

    def shifted(sign):
        return correction_loss(
            jax.tree.map(lambda w, v: w + sign * eps * v, weights, d)
        )

    pairs = zip(jax.tree.leaves(g), jax.tree.leaves(d), strict=True)
    along = sum(jnp.vdot(a, b) for a, b in pairs)
    np.testing.assert_allclose(along, (shifted(1) - shifted(-1)) / (2 * eps), rtol=1e-6)


CG = lx.CG(rtol=1e-12, atol=1e-12, max_steps=200)


def make_bilevel(l96, B, **options):
    """`(net, problem)`: bilevel 4D-Var learning the B scale and the forcing, inner
    and hypergradient solves tight (float64 gradient checks)."""
    options.setdefault("adjoint", optx.ImplicitAdjoint(linear_solver=CG))
    net = BilevelVar(
        theta=jnp.asarray(0.01),
        solver=optx.LBFGS(rtol=1e-12, atol=1e-12),
        **options,
    )
    return net, make_problem(l96, B, forcing=True)


def bilevel_loss(net, problem, obs, xb):
    def loss(hyper):
        n = eqx.tree_at(lambda m: (m.log_scale, m.theta), net, hyper)
        return jnp.mean((trajectory(n, problem, obs, xb) - obs.truth) ** 2)

    return eqx.filter_jit(loss)


def test_implicit_hypergradient_matches_finite_differences(l96_windows):
    """The implicit-function-theorem hypergradient of a loss of the converged 4D-Var
    analysis, for the B scale and the forcing, in float64 against central
    differences."""
    l96, B, windows = l96_windows
    obs, xb = windows[1], jnp.asarray(windows[1].truth[0]) + 1.0
    net, problem = make_bilevel(l96, B)
    loss = bilevel_loss(net, problem, obs, xb)
    hyper = (net.log_scale, net.theta)
    gradient = eqx.filter_jit(jax.grad(loss))(hyper)
    solution = eqx.filter_jit(lambda n: n.solve(problem, obs, xb))(net)
    inner = net.model_problem(problem)
    g = jax.grad(lambda c: inner.cost(c, obs, xb))(solution.value)
    assert jnp.linalg.norm(g.v) < 1e-6  # the inner problem is solved
    # eps = 1e-3: the inner solve's residual (~1e-8) divided by eps must stay below
    # the O(eps^2) truncation error.
    eps = 1e-3
    for i in range(2):
        up = list(hyper)
        down = list(hyper)
        up[i] = up[i] + eps
        down[i] = down[i] - eps
        fd = (loss(tuple(up)) - loss(tuple(down))) / (2 * eps)
        np.testing.assert_allclose(gradient[i], fd, rtol=1e-4)


def test_implicit_hypergradient_matches_unrolled_solver(l96_windows):
    """At a converged inner solution, backpropagation through every L-BFGS iteration
    gives the implicit hypergradient."""
    l96, B, windows = l96_windows
    obs, xb = windows[2], jnp.asarray(windows[2].truth[0]) + 1.0
    grads = []
    adjoints = (
        optx.ImplicitAdjoint(linear_solver=CG),
        optx.RecursiveCheckpointAdjoint(),
    )
    for adjoint in adjoints:
        net, problem = make_bilevel(l96, B, adjoint=adjoint, max_steps=200)
        hyper = (net.log_scale, net.theta)
        loss = bilevel_loss(net, problem, obs, xb)
        grads.append(eqx.filter_jit(jax.grad(loss))(hyper))
    # Differentiating the iterations converges to the implicit derivative as the
    # iterates do (to ~1e-8 here).
    assert tree_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def evidence_parts(net, problem, obs, xb, **options):
    """`hyper -> (evidence, cost at the inner solution)`, jitted."""

    def parts(hyper):
        n = eqx.tree_at(lambda m: (m.log_scale, m.theta), net, hyper)
        c = n.solve(problem, obs, xb).value
        cost = n.model_problem(problem).cost(c, obs, xb)
        return n.negative_log_evidence(problem, obs, xb, **options), cost

    return eqx.filter_jit(parts)


def test_evidence_is_laplace_marginal_likelihood_and_its_gradient(l96_windows):
    """The evidence is `J(v*) + log det(I + G^T G) / 2` with `G` the Jacobian of the
    whitened innovations (checked against a dense Jacobian), and its gradient in the
    B scale and the forcing (through the implicit solution, the Gauss-Newton
    Hessian's dependence on both, and the log-determinant) matches central
    differences in float64."""
    l96, B, windows = l96_windows
    obs, xb = windows[3], jnp.asarray(windows[3].truth[0]) + 1.0
    net, problem = make_bilevel(l96, B)
    parts = evidence_parts(net, problem, obs, xb)
    hyper = (net.log_scale, net.theta)
    evidence, cost = parts(hyper)
    v = eqx.filter_jit(lambda n: n.solve(problem, obs, xb).value.v)(net)
    inner = net.model_problem(problem)

    def residual(u):
        analysis = inner.analysis(Control(u), xb)
        return obs.innovations(inner.trajectory(analysis, T)).ravel()

    G = jax.jacfwd(residual)(v)
    logdet = jnp.linalg.slogdet(jnp.eye(v.size) + G.T @ G)[1]
    np.testing.assert_allclose(evidence, cost + logdet / 2, rtol=1e-10)
    gradient = eqx.filter_jit(jax.grad(lambda h: parts(h)[0]))(hyper)
    eps = 1e-3
    for i in range(2):
        up, down = list(hyper), list(hyper)
        up[i], down[i] = up[i] + eps, down[i] - eps
        fd = (parts(tuple(up))[0] - parts(tuple(down))[0]) / (2 * eps)
        np.testing.assert_allclose(gradient[i], fd, rtol=1e-4)


def test_stochastic_log_determinant_gradient_is_unbiased(l96_windows):
    """With probe vectors, the log-determinant's gradient (the whole gradient minus
    the cost's) is Hutchinson's estimate of the exact one; the value is the cost."""
    l96, B, windows = l96_windows
    obs, xb = windows[3], jnp.asarray(windows[3].truth[0]) + 1.0
    net, problem = make_bilevel(l96, B)
    hyper = (net.log_scale, net.theta)
    exact = evidence_parts(net, problem, obs, xb)
    key = jax.random.PRNGKey(0)
    stochastic = evidence_parts(net, problem, obs, xb, probes=400, key=key)
    value, cost = stochastic(hyper)
    np.testing.assert_allclose(value, cost, rtol=1e-12)
    g_cost, g_exact, g_stochastic = jax.jit(
        lambda h: (
            jax.grad(lambda h: exact(h)[1])(h),
            jax.grad(lambda h: exact(h)[0])(h),
            jax.grad(lambda h: stochastic(h)[0])(h),
        )
    )(hyper)
    for e, s, c in zip(g_exact, g_stochastic, g_cost, strict=True):
        assert abs(e - c) > 1e-3  # the log-determinant matters here
        np.testing.assert_allclose(s - c, e - c, rtol=0.1)


def test_evidence_loss_needs_a_bilevel_network(l96_windows, getkey):
    l96, B, windows = l96_windows
    net, problem = make_net(l96, B, getkey())
    with pytest.raises(ValueError, match="evidence loss needs a bilevel network"):
        Evidence()(net, problem, windows[0], windows[0].truth[0], key=getkey())


def test_continuation_weights_do_not_increase(l96_windows, getkey):
    l96, B, _ = l96_windows
    net, _ = make_net(l96, B, getkey(), continuation=True, regularisation=2.0)
    net = eqx.tree_at(lambda m: m.regularisation, net, jnp.asarray([0.3, 4.0, -3.0]))
    weights = np.asarray(net.regularisation_weights())
    assert np.all(np.diff(weights) <= 0)
    np.testing.assert_allclose(weights[0], np.exp(0.3))


def test_curvature_matches_dense_eigenvalue(l96_windows, getkey):
    """The power iteration's top eigenvalue of B H'^T H' against a dense one."""
    l96, B, windows = l96_windows
    obs, xb = windows[2], jnp.full(40, 2.0)
    net, problem = make_net(l96, B, getkey(), regularisation=1.0)

    def residual(x):
        return obs.innovations(problem.trajectory(Analysis(x), T)).ravel()

    J = jax.jacfwd(residual)(xb)
    S = jax.vmap(B.sqrt, in_axes=1, out_axes=1)(jnp.eye(40))
    top = np.linalg.eigvalsh(np.asarray(S.T @ J.T @ J @ S))[-1]
    estimate = float(net.curvature(problem, obs, xb, iterations=200))
    np.testing.assert_allclose(estimate, top + 1.0, rtol=1e-3)


def test_stable_steps_refuse_an_overflowing_curvature(l96_windows, getkey):
    """A Hessian that overflows (here error stds of 1e-200) raises, naming it,
    instead of giving a zero step and NaNs later."""
    l96, B, windows = l96_windows
    net, problem = make_net(l96, B, getkey())
    tiny = eqx.tree_at(lambda o: o.error_std, windows[0], windows[0].error_std * 1e-200)
    with pytest.raises(Exception, match="curvature of the window's Gauss-Newton"):
        net.with_stable_steps(problem, tiny, jnp.full(40, 2.0))


def test_masking_loss_never_reads_truth(l96_windows, getkey):
    """Training with the masking loss on windows whose truth is NaN gives exactly the
    parameters obtained with the real truth."""
    l96, B, windows = l96_windows
    poisoned = [
        eqx.tree_at(lambda o: o.truth, w, jnp.full_like(w.truth, jnp.nan))
        for w in windows
    ]
    net, problem = make_net(l96, B, getkey(), prior="proximal")
    loss = WeightedLoss(
        {
            "masking": Term(Masking()),
            "residual": Term(Residual(), 0.1),
            # the refined cost loss reads no truth either
            "cost": Term(Cost(refine=2, refine_cg=10), 0.1),
        }
    )
    settings = TrainSettings(
        steps=2, batch_size=2, validate_every=0, checkpoint_every=0, loss=loss
    )
    a, _ = train(net, problem, windows_batch(windows, (40,)), settings)
    b, _ = train(net, problem, windows_batch(poisoned, (40,)), settings)
    assert tree_allclose(eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array))
    loss = Masking()(net, problem, poisoned[0], jnp.full(40, 2.0), key=getkey())
    assert np.isfinite(float(loss))


def test_cost_loss_is_the_joint_4dvar_cost(l96_windows, getkey):
    """Summed over the windows (times their observation counts), the cost loss is
    the joint 4D-Var cost of the networks' analyses and the shared forcing: each
    window's problem cost at the control of the analysis, with the parameter prior
    counted once."""
    l96, B, windows = l96_windows
    theta = jnp.asarray(0.05)
    net, problem = make_net(l96, B, getkey(), theta=theta)
    data = windows_batch(windows[:3], (40,))
    total, joint, values = 0.0, -2 * 0.5 * theta**2, []  # a prior per window
    for i in range(3):
        obs = jax.tree.map(lambda a, i=i: a[i], data.obs)
        background = data.background[i]
        x = net(problem, obs, background)[0].initial_state
        control = Control(B.whiten(x - background), theta, None)
        analysis = problem.analysis(control, background)
        np.testing.assert_allclose(analysis.initial_state, x, atol=1e-10)
        joint = joint + problem.cost(control, obs, background)
        values.append(Cost()(net, problem, obs, background, key=getkey(), windows=3))
        total = total + values[-1] * jnp.sum(obs.mask)
    np.testing.assert_allclose(total, joint, rtol=1e-10)
    # batch_loss: the mean over the batch, the prior shared by the `windows` given.
    loss = WeightedLoss.of(cost=1.0)
    value, _ = batch_loss(loss, net, problem, data, key=getkey(), windows=3)
    np.testing.assert_allclose(value, np.mean(values), rtol=1e-12)
    value, _ = batch_loss(loss, net, problem, data, key=getkey())
    np.testing.assert_allclose(value, np.mean(values), rtol=1e-12)  # default: batch


def test_refined_cost_loss_learns_the_joint_4dvar_parameters(l96_windows, getkey):
    """With `refine`, the cost loss's value is the 4D-Var minimum over the state
    (the refinement reaches a stationary point), its parameter gradient is the
    derivative of that minimum (finite differences, re-solving at each forcing: the
    envelope theorem), and the network's own leaves get the plain cost loss's
    gradient (the model held)."""
    from assim import refine_analysis

    l96, B, windows = l96_windows
    obs, background = windows[0], jnp.full(40, 2.0)
    net, problem = make_net(l96, B, getkey(), theta=jnp.asarray(0.05))
    refined_cost = Cost(refine=15, refine_cg=60)
    x = eqx.filter_jit(net)(problem, obs, background)[0].initial_state
    x_star = eqx.filter_jit(refine_analysis)(
        net, problem, obs, background, x, steps=15, cg_steps=60
    )
    model = net.model_problem(problem)

    @jax.jit
    def stationarity(x):  # the gradient of the window cost in whitened coordinates
        control = model.control(Analysis(x), background)
        g = jax.grad(lambda c: model.cost(c, obs, background))(control)
        return jnp.linalg.norm(g.v)

    assert stationarity(x) > 1.0
    assert stationarity(x_star) < 1e-6 * stationarity(x)

    def loss_at(theta, loss):
        n = eqx.tree_at(lambda n: n.theta, net, theta)
        return loss(n, problem, obs, background, key=None)

    refined = jax.jit(lambda t: loss_at(t, refined_cost))
    plain_loss = jax.jit(lambda t: loss_at(t, Cost()))
    theta = jnp.asarray(0.05)
    assert float(refined(theta)) < float(plain_loss(theta))
    grad = jax.jit(jax.grad(refined))(theta)
    h = 1e-4
    fd = (refined(theta + h) - refined(theta - h)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5)
    # The plain cost loss's parameter gradient carries the network's error.
    plain = jax.jit(jax.grad(plain_loss))(theta)
    assert abs(float(plain - grad)) > 0.1 * abs(float(grad))

    def step_grad(loss):
        spec = eqx.tree_at(
            lambda n: n.log_step, jax.tree.map(lambda _: False, net), True
        )
        params, static = eqx.partition(net, spec)
        return jax.jit(
            jax.grad(
                lambda p: loss(
                    eqx.combine(p, static), problem, obs, background, key=None
                )
            )
        )(params).log_step

    np.testing.assert_allclose(step_grad(refined_cost), step_grad(Cost()), rtol=1e-10)


def test_refined_analyses_are_warm_started_across_steps(l96_windows, getkey, tmp_path):
    """`train` keeps one refined analysis per window, started at the network's
    output: with the model fixed (no learned parameters), 3 steps that each draw
    every window leave the analyses 3 Gauss-Newton iterations refine the untrained
    network's outputs to (Gauss-Newton keeps no state between iterations)."""
    from assim import refine_analysis

    l96, B, windows = l96_windows
    data = windows_batch(windows[:2], (40,))
    net, problem = make_net(l96, B, getkey())
    settings = TrainSettings(
        steps=3,
        batch_size=2,
        validate_every=0,
        checkpoint_every=0,
        loss=WeightedLoss({"cost": Term(Cost(refine=1, refine_cg=8))}),
    )
    path = tmp_path / "ck.eqx"
    train(net, problem, data, settings, checkpoint=path)
    like = init_state(net, settings)
    like = eqx.tree_at(
        lambda s: s.analyses, like, jnp.zeros((2, 40)), is_leaf=lambda x: x is None
    )
    state, _ = load_checkpoint(path, like)
    for i in range(2):
        obs = jax.tree.map(lambda a, i=i: a[i], data.obs)
        background = data.background[i]
        x = net(problem, obs, background)[0].initial_state
        expected = refine_analysis(
            net, problem, obs, background, x, steps=3, cg_steps=8
        )
        assert not np.allclose(expected, x, atol=1e-3)
        np.testing.assert_allclose(state.analyses[i], expected, rtol=1e-8, atol=1e-8)


def test_cycled_backgrounds_are_what_cycling_feeds_the_network(l96_windows, getkey):
    """`cycled_backgrounds` (one scan) gives each window the background that
    `cycle` (the loop `assim-run` runs) gives it; after a gap in the numbering
    the window keeps its own background."""
    l96, B, windows = l96_windows
    data = windows_batch(windows[:4], (40,))
    net, problem = make_net(l96, B, getkey())
    backgrounds = cycled_backgrounds(net, problem, data)
    results = list(cycle(net, problem, windows[:4], data.background[0]))
    expected = np.stack([r.background[0] for r in results])
    np.testing.assert_allclose(backgrounds, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(backgrounds[1:], data.background[1:], atol=0.1)
    gap = cycled_backgrounds(net, problem, data, np.array([False, True, False, True]))
    np.testing.assert_allclose(gap[2], data.background[2])
    restarted = list(cycle(net, problem, windows[2:4], data.background[2]))
    np.testing.assert_allclose(gap[3], restarted[1].background[0], rtol=1e-6, atol=1e-6)


def test_training_on_cycled_backgrounds(l96_windows, getkey, tmp_path):
    """With `cycle_every`, training starts from the untrained network's cycled
    backgrounds and refreshes them with the trained network's (the windows given
    out of time order and numbered: the timeline follows the numbers); the
    validation windows are cycled too, and a resumed run continues exactly."""
    l96, B, windows = l96_windows
    order = [2, 0, 3, 1]  # training windows' numbers in the file
    data = windows_batch([windows[k] for k in order], (40,))
    validation = windows_batch(windows[4:6], (40,))
    numbers = (np.array(order), np.array([4, 5]))
    net, problem = make_net(l96, B, getkey())
    common = dict(
        batch_size=2,
        validate_every=2,
        checkpoint_every=1,
        cycle_every=2,
        loss=WeightedLoss.of(supervised=1.0),
    )
    path = tmp_path / "ck.eqx"
    train_args = dict(validation=validation, window_numbers=numbers)
    full, records = train(
        net, problem, data, TrainSettings(steps=4, **common), **train_args
    )
    assert [r.get("cycled_windows") for r in records] == [None, None, 5, None]
    in_time = windows_batch(windows[:6], (40,))
    train(
        net,
        problem,
        data,
        TrainSettings(steps=3, **common),
        checkpoint=path,
        **train_args,
    )
    like = init_state(net, TrainSettings(**common))
    like = eqx.tree_at(
        lambda s: s.backgrounds, like, jnp.zeros((6, 40)), is_leaf=lambda x: x is None
    )
    state, _ = load_checkpoint(path, like)
    # refreshed before step 3 with the network after step 2 (not the untrained one)
    before = cycled_backgrounds(net, problem, in_time)
    assert not np.allclose(state.backgrounds, before, atol=1e-3)
    two = train(net, problem, data, TrainSettings(steps=2, **common), **train_args)[0]
    np.testing.assert_allclose(
        state.backgrounds, cycled_backgrounds(two, problem, in_time), rtol=1e-5
    )
    resumed, _ = train(
        net,
        problem,
        data,
        TrainSettings(steps=4, **common),
        checkpoint=path,
        resume=True,
        **train_args,
    )
    assert tree_allclose(
        eqx.filter(full, eqx.is_array), eqx.filter(resumed, eqx.is_array)
    )
    with pytest.raises(ValueError, match="window_numbers"):
        train(
            net,
            problem,
            data,
            TrainSettings(steps=1, **common),
            validation=validation,
            window_numbers=(np.array([0, 1, 2, 2]), np.array([4, 5])),
        )


@pytest.mark.parametrize("refined", [False, True])
def test_resume_continues_exactly(l96_windows, getkey, tmp_path, refined):
    """4 steps in one go == 2 steps, stop, resume to 4 (same draws, same state, the
    refined cost loss's stored analyses included), and the metrics log holds one
    record per step."""
    l96, B, windows = l96_windows
    data = windows_batch(windows, (40,))
    common = dict(batch_size=2, validate_every=0, checkpoint_every=1)
    options = dict(momentum=True)
    if refined:
        terms = {"masking": Term(Masking()), "cost": Term(Cost(1, 5), 0.1)}
        common.update(loss=WeightedLoss(terms))
        options.update(theta=jnp.asarray(0.05))
    net, problem = make_net(l96, B, getkey(), **options)
    full, _ = train(net, problem, data, TrainSettings(steps=4, **common))
    path, log = tmp_path / "ck.eqx", tmp_path / "log.jsonl"
    train(
        net, problem, data, TrainSettings(steps=2, **common), checkpoint=path, log=log
    )
    resumed, _ = train(
        net,
        problem,
        data,
        TrainSettings(steps=4, **common),
        checkpoint=path,
        log=log,
        resume=True,
    )
    assert tree_allclose(
        eqx.filter(full, eqx.is_array), eqx.filter(resumed, eqx.is_array)
    )
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_divergence_stops_and_keeps_the_last_good_state(l96_windows, getkey, tmp_path):
    """A healthy run checkpointed at step 3, resumed at a diverging rate, stops with
    a message and leaves the step-3 checkpoint as it was (the diverged state is
    not written); resumed again at a sane rate, training continues from it. A run
    that diverges at once from the start writes no checkpoint at all."""
    l96, B, windows = l96_windows
    data = windows_batch(windows, (40,))
    net, problem = make_net(l96, B, getkey())
    sane = dict(
        batch_size=2,
        validate_every=0,
        checkpoint_every=1,
        loss=WeightedLoss.of(supervised=1.0),
    )
    wild = dict(sane, learning_rate=1e3, warmup_steps=1, clip_norm=1e6)
    path = tmp_path / "ck.eqx"
    train(net, problem, data, TrainSettings(steps=3, **sane), checkpoint=path)
    healthy = path.read_bytes()
    with pytest.raises(TrainingStopped, match=r"last good state \(step 3\)"):
        train(
            net,
            problem,
            data,
            TrainSettings(steps=10, **wild),
            checkpoint=path,
            resume=True,
        )
    assert path.read_bytes() == healthy
    _, records = train(
        net,
        problem,
        data,
        TrainSettings(steps=5, **sane),
        checkpoint=path,
        resume=True,
    )
    assert [r["step"] for r in records] == [4, 5]
    assert all(np.isfinite(r["loss"]) for r in records)
    fresh = tmp_path / "fresh.eqx"
    with pytest.raises(TrainingStopped, match="non-finite") as stopped:
        train(net, problem, data, TrainSettings(steps=10, **wild), checkpoint=fresh)
    header = json.loads(fresh.read_bytes().split(b"\n", 1)[0]) if fresh.exists() else {}
    # Whatever it kept had a finite loss: resuming it at a sane rate continues.
    if header:
        assert f"step {header['step']}" in str(stopped.value)
        train(
            net,
            problem,
            data,
            TrainSettings(steps=header["step"] + 1, **sane),
            checkpoint=fresh,
            resume=True,
        )


def test_no_raising_check_inside_analysis_and_training(l96_windows, getkey):
    """`WindowProblem.without_raising`: a rollout that blows up gives NaN where the
    default problem raises. The programs of `analyse_window` (for a network and for
    4D-Var) hold no host callback, which would keep them out of JAX's persistent
    compilation cache, and give a window the model cannot integrate an infinite
    cost (a failed window); training on such a window stops on the host with
    `TrainingStopped`, naming the non-finite loss."""
    l96, B, windows = l96_windows
    net, problem = make_net(l96, B, getkey())
    blown = Analysis(1e200 * jnp.cos(jnp.arange(40.0)), None, None)  # overflows
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(problem.trajectory(blown, T))
    states = problem.without_raising().trajectory(blown, T)
    assert not jnp.all(jnp.isfinite(states))
    obs, xb = windows[0], jnp.asarray(windows[0].truth[0]) + 1.0
    analyse = eqx.filter_jit(analyse_window)
    for analyser in (net, Variational(incremental(), 2)):
        assert "callback" not in analyse.lower(analyser, problem, obs, xb).as_text()
        assert np.all(np.isfinite(analyse(analyser, problem, obs, xb)["cost"]))
        out = analyse(analyser, problem, obs, blown.initial_state)
        assert out["cost"][0] == np.inf
    data = windows_batch(windows, (40,))
    huge = jnp.broadcast_to(blown.initial_state, data.background.shape)
    data = eqx.tree_at(lambda b: b.background, data, huge)
    settings = TrainSettings(steps=2, batch_size=2, validate_every=0)
    with pytest.raises(TrainingStopped, match="step 1: non-finite loss"):
        train(net, problem, data, settings)


def test_bilevel_hypergradient_through_newton_krylov(l96_windows, getkey):
    """Through backward-Euler Lorenz-96 (Newton-Krylov stages, which JAX cannot
    differentiate forward over reverse) the bilevel hypergradient takes its Hessian
    products reverse over reverse: it matches central differences (float64), and on
    an explicit scheme the two kinds of products give the same hypergradient.
    Forward products are refused for such a scheme with a one-line error; unrolled
    networks accept it too."""
    l96, B, windows = l96_windows
    obs, xb = windows[1], jnp.asarray(windows[1].truth[0]) + 1.0
    implicit = sim.Simulator(l96.model, sim.backward_euler(), l96.dt)
    make_net(implicit, B, getkey())
    forward, problem = make_bilevel(implicit, B)
    with pytest.raises(ValueError, match="Newton-Krylov"):
        forward(problem, obs, xb)
    net, problem = make_bilevel(implicit, B, adjoint=None)
    assert isinstance(net.adjoint_for(problem), ReverseImplicitAdjoint)
    net = eqx.tree_at(
        lambda n: n.adjoint,
        net,
        ReverseImplicitAdjoint(CG),
        is_leaf=lambda x: x is None,
    )
    loss = bilevel_loss(net, problem, obs, xb)
    hyper = (net.log_scale, net.theta)
    gradient = eqx.filter_jit(jax.grad(loss))(hyper)
    eps = 1e-3
    for i in range(2):
        up, down = list(hyper), list(hyper)
        up[i], down[i] = up[i] + eps, down[i] - eps
        fd = (loss(tuple(up)) - loss(tuple(down))) / (2 * eps)
        np.testing.assert_allclose(gradient[i], fd, rtol=1e-4)
    grads = []
    for adjoint in (optx.ImplicitAdjoint(linear_solver=CG), ReverseImplicitAdjoint(CG)):
        n, problem = make_bilevel(l96, B, adjoint=adjoint)
        grads.append(eqx.filter_jit(jax.grad(bilevel_loss(n, problem, obs, xb)))(hyper))
    # Each re-solves the inner 4D-Var: they agree to its accuracy (rounding moves
    # where L-BFGS stops).
    assert tree_allclose(grads[0], grads[1], rtol=1e-7, atol=0)


def test_parameter_learning_rate_moves_theta_at_its_own_rate(l96_windows, getkey):
    """Adam moves a coordinate by about its learning rate per step (warm-up: the
    first step's rate is 0): the learned forcing at `parameter_learning_rate`,
    the network's weights at `learning_rate`."""
    l96, B, windows = l96_windows
    data = windows_batch(windows[:2], (40,))
    net, problem = make_net(l96, B, getkey(), theta=jnp.asarray(0.0))
    settings = TrainSettings(
        steps=2,
        batch_size=2,
        learning_rate=1e-4,
        parameter_learning_rate=0.1,
        warmup_steps=1,
        validate_every=0,
        checkpoint_every=0,
        loss=WeightedLoss.of(supervised=1.0),
    )
    trained, _ = train(net, problem, data, settings)
    np.testing.assert_allclose(abs(float(trained.theta)), 0.1, rtol=0.05)
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        eqx.filter(eqx.tree_at(lambda m: m.theta, trained, None), eqx.is_inexact_array),
        eqx.filter(eqx.tree_at(lambda m: m.theta, net, None), eqx.is_inexact_array),
    )
    assert 0 < max(jax.tree.leaves(moved)) <= 1.05e-4
    with pytest.raises(ValueError, match="learning rates must be positive"):
        TrainSettings(parameter_learning_rate=-1.0)


def test_learned_parts_are_modules_or_shortcuts(l96_windows, getkey):
    """A prior, gradient solver or warm start passed as a module is used as given;
    the string / `True` shortcuts build the same modules from the network's key."""
    from assim import ConvLSTMSolver, ConvNet, ProximalPrior

    l96, B, windows = l96_windows
    grid, key = l96.model.grid, getkey()
    k_prior, k_solver, _ = jax.random.split(key, 3)
    given = UnrolledVar(
        grid,
        3,
        prior=ProximalPrior(ConvNet(grid, 1, 1, 4, 2, 3, key=k_prior), 3.6),
        gradient_solver=ConvLSTMSolver(grid, 8, 3, key=k_solver),
        scale=3.6,
        width=4,
        depth=2,
        key=key,
    )
    built = UnrolledVar(
        grid,
        3,
        prior="proximal",
        gradient_solver=True,
        scale=3.6,
        width=4,
        depth=2,
        key=key,
    )
    assert tree_allclose(given, built, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prior must be"):
        UnrolledVar(grid, 3, prior="tv", key=key)


def test_keep_best_and_patience(l96_windows, getkey, tmp_path):
    """Early stopping: with `keep_best` the returned network and the checkpoint are
    the state of the lowest validation loss (re-evaluated: the same loss); with
    `patience=2` training stops two validations after its best."""
    from assim import evaluate

    l96, B, windows = l96_windows
    data = windows_batch(windows, (40,))
    net, problem = make_net(l96, B, getkey())
    settings = TrainSettings(
        steps=12,
        batch_size=2,
        learning_rate=0.3,  # a rate that overshoots: the validation loss turns up
        warmup_steps=1,
        validate_every=1,
        checkpoint_every=0,
        loss=WeightedLoss.of(supervised=1.0),
        keep_best=True,
        patience=2,
    )
    path = tmp_path / "best.eqx"
    trained, records = train(
        net, problem, data, settings, validation=data, checkpoint=path
    )
    losses = [r["validation"]["loss"] for r in records]
    best = int(np.argmin(losses))
    assert records[-1]["validation_best_step"] == best + 1
    assert records[-1].get("stopped_early"), losses  # it turned up in 12 steps
    assert len(records) == best + 3, losses  # two validations without improvement
    np.testing.assert_allclose(
        evaluate(trained, problem, data, settings)["loss"], losses[best], rtol=1e-5
    )
    assert json.loads(path.read_bytes().split(b"\n", 1)[0])["step"] == best + 1
