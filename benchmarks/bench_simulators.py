"""Speed and memory of rollouts and their gradients, side by side in one run.

For 2D Burgers and 2D Navier-Stokes at several grid sizes and for Kuramoto-Sivashinsky:
the time of a 20-step rollout, of the gradient of a loss of it, their ratio and the
peak memory XLA allocates for each (`compiled.memory_analysis()`: temporaries +
outputs). Beside them, in the same run:

- for Burgers, in float32 and float64, the Krylov iterations per step of the forward
  Newton solves and of the gradient's transpose solves (`simulators.KrylovCounter`);
- the same Burgers rollout through diffrax's built-in `ImplicitEuler` with its default
  adjoint (dense Jacobians), where it fits;
- the same equations stepped by exponax (ETDRK2, Cox & Matthews 2002), with each
  method's time error against its own solution at dt/10, so that speed is compared at
  measured accuracy;
- the Burgers gradient with tighter Newton/Krylov tolerances (more iterations) and
  with the unrolled (differentiate-through-Newton) adjoint, to show that the implicit
  adjoint's memory does not grow with the iteration count.

Run: `python benchmarks/bench_simulators.py [--sizes 64 128 256] [--repeats 3]`.
"""

import argparse
import platform
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import simulators as sim

N_STEPS = 20


def _timeit(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _memory_mib(compiled):
    analysis = compiled.memory_analysis()
    if analysis is None:
        return float("nan")
    used = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    return used / 2**20


def _initial_state(shape, seed=0):
    """A smooth random field: random Fourier coefficients with a k^-2 decay."""
    rng = np.random.default_rng(seed)
    coeffs = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    ks = np.meshgrid(*[np.fft.fftfreq(n, 1 / n) for n in shape], indexing="ij")
    k2 = sum(k**2 for k in ks)
    coeffs = coeffs * (k2 > 0) / (1 + k2)
    u = np.real(np.fft.ifftn(coeffs))
    return jnp.asarray(u / np.abs(u).max(), dtype=jnp.float32)


def measure(name, size, method, forward_fn, loss_fn, u0, repeats, steps_fn=None):
    # Compiled once each: timed, and asked for their memory.
    forward = jax.jit(forward_fn).lower(u0).compile()
    grad = jax.jit(jax.grad(loss_fn)).lower(u0).compile()
    t_fwd = _timeit(forward, u0, repeats=repeats)
    t_grad = _timeit(grad, u0, repeats=repeats)
    g = grad(u0)
    row = {
        "case": name,
        "size": size,
        "method": method,
        "forward_s": t_fwd,
        "grad_s": t_grad,
        "ratio": t_grad / t_fwd,
        "forward_mib": _memory_mib(forward),
        "grad_mib": _memory_mib(grad),
        "newton": float(jnp.mean(steps_fn(u0))) if steps_fn else float("nan"),
        "grad_finite": bool(jnp.all(jnp.isfinite(g))),
    }
    return row


def _ours(simulator):
    def forward(u0):
        return simulator.rollout(u0, N_STEPS)[-1]

    def loss(u0):
        return jnp.mean(forward(u0) ** 2)

    def steps(u0):
        return simulator.rollout(u0, N_STEPS, with_info=True)[1]["newton_steps"]

    return forward, loss, steps


def _diffrax_implicit_euler(model, dt):
    """diffrax's built-in implicit Euler, default root finder adjoint (the trap)."""
    solver = diffrax.ImplicitEuler(root_finder=optx.Newton(rtol=1e-5, atol=1e-5))

    def forward(u0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: model.tendency(y)),
            solver,
            t0=0.0,
            t1=N_STEPS * dt,
            dt0=dt,
            y0=u0,
            stepsize_controller=diffrax.ConstantStepSize(),
            saveat=diffrax.SaveAt(t1=True),
        )
        return sol.ys[0]

    return forward, lambda u0: jnp.mean(forward(u0) ** 2)


def krylov_per_step(model, dt, u0, **solver_options):
    """Krylov iterations per time step of the forward rollout and of the transpose
    solves of its gradient (`KrylovCounter`; a separate, untimed run)."""
    counter = sim.KrylovCounter()
    solver = sim.NewtonKrylov(counter=counter, **solver_options)
    _, loss, _ = _ours(sim.Simulator(model, sim.backward_euler(solver), dt))
    jax.block_until_ready(jax.grad(loss)(u0))
    totals = counter.totals()
    return {
        "krylov_forward": totals["forward"]["iterations"] / N_STEPS,
        "krylov_transpose": totals["transpose"]["iterations"] / N_STEPS,
    }


def burgers_rows(sizes, repeats, diffrax_max):
    rows = []
    for n in sizes:
        grid = sim.Grid((n, n), (1.0, 1.0))
        model = sim.Burgers(grid, 2e-3)
        dt = 0.5 * grid.spacing[0]  # CFL 0.5 for |u| <= 1; viscous number >> 1
        for x64 in (False, True):
            with jax.enable_x64(x64):
                u0 = _initial_state((n, n))
                u0 = u0.astype(jnp.float64 if x64 else jnp.float32)
                simulator = sim.Simulator(model, sim.backward_euler(), dt)
                fwd, loss, steps = _ours(simulator)
                row = measure(
                    "burgers2d",
                    n,
                    f"{'f64' if x64 else 'f32'} ours: BE Newton-GMRES, IFT adjoint",
                    fwd,
                    loss,
                    u0,
                    repeats,
                    steps,
                )
                rows.append(row | krylov_per_step(model, dt, u0))
        u0 = _initial_state((n, n))
        if n <= diffrax_max:
            fwd, loss = _diffrax_implicit_euler(model, dt)
            rows.append(
                measure(
                    "burgers2d",
                    n,
                    "diffrax ImplicitEuler, default adjoint",
                    fwd,
                    loss,
                    u0,
                    max(1, repeats // 3),
                )
            )
        else:
            rows.append(
                {
                    "case": "burgers2d",
                    "size": n,
                    "method": "diffrax ImplicitEuler, default adjoint",
                    # optimistix.Newton re-forms the Jacobian and factorises it at
                    # every iteration: ~3 per step, 20 steps, (N^2)^3 / 3 flops each.
                    "skipped": f"dense Jacobian {(n * n) ** 2 * 4 / 2**30:.0f} GiB"
                    f", 60 LUs of {(n * n) ** 3 / 3:.1e} flop each: hours on this"
                    " machine (--diffrax-max to run it)",
                }
            )
    # Iteration count vs memory, in float64 so that tight tolerances are reachable.
    n = sizes[0]
    with jax.enable_x64(True):
        grid = sim.Grid((n, n), (1.0, 1.0))
        model = sim.Burgers(grid, 2e-3)
        dt = 0.5 * grid.spacing[0]
        u0 = _initial_state((n, n)).astype(jnp.float64)
        # Inexact Newton (GMRES(1), inner tolerance 0.5): tightening the Newton
        # tolerance from 1e-2 to 1e-12 multiplies the iterations; the memory of the
        # gradient should not follow. Same adjoint tolerance in both.
        common = {"krylov_tol": 0.5, "restart": 1, "adjoint_tol": 1e-11}
        loose = {"rtol": 1e-2, "atol": 1e-2, **common}
        tight = {"rtol": 1e-12, "atol": 1e-12, **common}
        variants = [
            ("f64 ours: tol 1e-2", sim.NewtonKrylov(**loose)),
            ("f64 ours: tol 1e-12 (more iterations)", sim.NewtonKrylov(**tight)),
            (
                "f64 unrolled Newton adjoint, tol 1e-2",
                sim.NewtonKrylov(**loose, adjoint="unrolled"),
            ),
            (
                "f64 unrolled Newton adjoint, tol 1e-12",
                sim.NewtonKrylov(**tight, adjoint="unrolled"),
            ),
        ]
        for label, solver in variants:
            simulator = sim.Simulator(model, sim.backward_euler(solver), dt)
            fwd, loss, steps = _ours(simulator)
            row = measure("burgers2d-iters", n, label, fwd, loss, u0, repeats, steps)
            if solver.adjoint == "implicit":
                options = {"rtol": solver.rtol, "atol": solver.atol, **common}
                row |= krylov_per_step(model, dt, u0, **options)
            rows.append(row)
    return rows


def _exponax_forward(stepper, n_steps):
    def forward(u0):
        u = u0[None]
        u = jax.lax.fori_loop(0, n_steps, lambda i, v: stepper(v), u)
        return u[0]

    return forward


def _self_error(make_forward, u0, dt):
    """Relative max error at t = N_STEPS dt against the same method at dt / 10.

    **Returns:** `(error, fine solution)`.
    """
    coarse = jax.jit(make_forward(dt, N_STEPS))(u0)
    fine = jax.jit(make_forward(dt / 10, 10 * N_STEPS))(u0)
    return float(jnp.max(jnp.abs(coarse - fine)) / jnp.max(jnp.abs(fine))), fine


def spectral_rows(sizes, repeats):
    import exponax as ex

    rows = []
    cases = [("ks", 128, 0.5)] + [("navier-stokes2d", n, None) for n in sizes]
    for case, n, dt in cases:
        if case == "ks":
            model = sim.KuramotoSivashinsky()
            u0 = 0.5 * _initial_state((n,))

            def make_ex(dt_, steps, n=n):
                stepper = ex.stepper.KuramotoSivashinskyConservative(
                    1, 32 * np.pi, n, dt_
                )
                return _exponax_forward(stepper, steps)
        else:
            nu = 1e-3
            model = sim.NavierStokes2D(n, nu=nu, alpha=0.0, amplitude=0.0)
            dt = 0.25 * (2 * np.pi / n)  # CFL 0.25 at max |u| = 1
            u0 = _initial_state((n, n))
            u0 = u0 / jnp.max(jnp.abs(jnp.stack(model.velocity(u0))))  # max |u| = 1

            def make_ex(dt_, steps, n=n, nu=nu):
                stepper = ex.stepper.NavierStokesVorticity(
                    2, 2 * np.pi, n, dt_, diffusivity=nu
                )
                return _exponax_forward(stepper, steps)

        def make_ours(dt_, steps, model=model):
            s = sim.Simulator(model, sim.IMEXRungeKutta("ars222"), dt_)
            return lambda u: s.rollout(u, steps)[-1]

        simulator = sim.Simulator(model, sim.IMEXRungeKutta("ars222"), dt)
        fwd, loss, _ = _ours(simulator)
        row = measure(
            case, n, "ours: IMEX ARS(2,2,2), FFT solves", fwd, loss, u0, repeats
        )
        row["error"], ours_fine = _self_error(make_ours, u0, dt)
        rows.append(row)
        ex_fwd = make_ex(dt, N_STEPS)
        row = measure(
            case,
            n,
            "exponax ETDRK2",
            ex_fwd,
            lambda u, f=ex_fwd: jnp.mean(f(u) ** 2),
            u0,
            repeats,
        )
        row["error"], ex_fine = _self_error(make_ex, u0, dt)
        # Same equations? Compare the two at dt/10 (both time-converged there).
        row["agreement"] = float(
            jnp.max(jnp.abs(ours_fine - ex_fine)) / jnp.max(jnp.abs(ours_fine))
        )
        rows.append(row)
    return rows


def _fmt(x, spec):
    return (
        "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)
    )


def print_table(rows):
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, float32 unless f64, {N_STEPS} steps"
    )
    head = (
        "| case | N | method | forward s | grad s | grad/fwd | fwd MiB | "
        "grad MiB | Newton/step | Krylov it./step fwd | Krylov it./step adjoint "
        "| rel. time error | vs ours |"
    )
    print(head)
    print("|---" * 13 + "|")
    for r in rows:
        if "skipped" in r:
            print(
                f"| {r['case']} | {r['size']} | {r['method']} | skipped: "
                f"{r['skipped']} |||||||||"
            )
            continue
        print(
            f"| {r['case']} | {r['size']} | {r['method']} | "
            f"{_fmt(r['forward_s'], '.4f')} | {_fmt(r['grad_s'], '.4f')} | "
            f"{_fmt(r['ratio'], '.2f')} | {_fmt(r['forward_mib'], '.1f')} | "
            f"{_fmt(r['grad_mib'], '.1f')} | {_fmt(r['newton'], '.1f')} | "
            f"{_fmt(r.get('krylov_forward'), '.0f')} | "
            f"{_fmt(r.get('krylov_transpose'), '.0f')} | "
            f"{_fmt(r.get('error'), '.1e')} | {_fmt(r.get('agreement'), '.1e')} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--diffrax-max",
        type=int,
        default=64,
        help="largest N for the dense diffrax baseline",
    )
    args = parser.parse_args()
    rows = burgers_rows(args.sizes, args.repeats, args.diffrax_max)
    rows += spectral_rows(args.sizes, args.repeats)
    print_table(rows)


if __name__ == "__main__":
    main()
