"""What do the implicit stage solves of a variable-coefficient diffusion cost with
conjugate gradients against GMRES?

The bundled dataset's model (2D advection-diffusion with a diffusivity field) stepped
by IMEX ARS(2,2,2), `assim-train`'s default and the warm-start hybrid's refinement:
each implicit stage solves `(I - eta L) x = r` with `L = div(kappa grad)`, by
preconditioned conjugate gradients since `AdvectionDiffusion` declares
`symmetric_linear` (the finite-volume diffusion is symmetric negative semidefinite),
by GMRES(20) before. Both run here side by side: the same model with
`symmetric_linear = False` is the GMRES one. For each grid size and precision: a
40-step rollout's time, the time of the gradient of a loss of it with respect to
the initial state and the diffusivity field, and the largest difference between
the two solvers' final states and diffusivity gradients relative to their size
(both solve to the same tolerance). Backward Euler (Newton-Krylov, GMRES on the
non-symmetric stage Jacobian) is the reference row, with its default GMRES restart
length (5) and with 10 (the default until f5d2c60): lineax tests GMRES's
convergence once per restart cycle, so the restart length sets how many whole
cycles a solve pays for.

Run: `python benchmarks/bench_stage_solves.py [--sizes 32 64 128] [--repeats 5]`.
"""

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np
from bench_simulators import _timeit

import simulators as sim

N_STEPS = 40
GROUP = 4  # rows per size and precision: CG, GMRES(20), backward Euler (restart 5, 10)


class GMRESDiffusion(sim.AdvectionDiffusion):
    """The same model, its stage solves by GMRES (as before `symmetric_linear`)."""

    symmetric_linear = False


def _fields(n, dtype):
    y, x = np.meshgrid(*(np.arange(n) / n,) * 2, indexing="ij")
    kappa = 0.02 * np.exp(0.4 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y))
    source = 3 * np.cos(2 * np.pi * (x + y)) + 2 * np.cos(2 * np.pi * (3 * y + 2 * x))
    u0 = np.sin(2 * np.pi * x) * np.cos(4 * np.pi * y)
    return (jnp.asarray(a, dtype) for a in (u0, kappa, source))


def measure(model_type, scheme, n, dtype, repeats):
    u0, kappa, source = _fields(n, dtype)
    grid = sim.Grid((n, n), (1.0, 1.0))

    def forward(u0, kappa):
        model = model_type(grid, kappa, [0.1, 0.2], source)
        return sim.Simulator(model, scheme, 0.02).rollout(u0, N_STEPS)[-1]

    def loss(u0, kappa):
        return jnp.mean(forward(u0, kappa) ** 2)

    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return {
        "forward_s": _timeit(fwd, u0, kappa, repeats=repeats),
        "grad_s": _timeit(grad, u0, kappa, repeats=repeats),
        "final": np.asarray(fwd(u0, kappa)),
        "grad_kappa": np.asarray(grad(u0, kappa)[1]),
    }


def _reference(n, dtype, repeats, **solver_options):
    """Backward Euler (its defaults but `solver_options`), or why it did not run."""
    scheme = sim.backward_euler(sim.NewtonKrylov(**solver_options))
    try:
        return measure(sim.AdvectionDiffusion, scheme, n, dtype, repeats)
    except Exception as error:  # an error raised inside the compiled rollout
        lines = [line for line in str(error).splitlines() if "RuntimeError:" in line]
        return {"failed": (lines or [str(error)])[0].split("Error: ", 1)[-1]}


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(sizes, repeats):
    rows = []
    for n in sizes:
        for x64 in (False, True):
            with jax.enable_x64(x64):
                dtype = jnp.float64 if x64 else jnp.float32
                imex = sim.IMEXRungeKutta("ars222")
                cg = measure(sim.AdvectionDiffusion, imex, n, dtype, repeats)
                gmres = measure(GMRESDiffusion, imex, n, dtype, repeats)
                be = _reference(n, dtype, repeats)
                be10 = _reference(n, dtype, repeats, restart=10)
            precision = "f64" if x64 else "f32"
            for name, r in (("IMEX, CG", cg), ("IMEX, GMRES(20)", gmres)):
                rows.append({"n": n, "precision": precision, "solver": name, **r})
            rows[-2]["state_difference"] = _relative(cg["final"], gmres["final"])
            rows[-2]["gradient_difference"] = _relative(
                cg["grad_kappa"], gmres["grad_kappa"]
            )
            restarts = (("backward Euler", be), ("backward Euler, GMRES(10)", be10))
            for name, r in restarts:
                rows.append({"n": n, "precision": precision, "solver": name, **r})
            print(f"done {n} {precision}", flush=True)
    return rows


def print_table(rows):
    machine = f"{platform.machine()} {platform.processor()}, jax {jax.__version__}"
    print(f"\n{machine}, {jax.devices()[0].platform}; {N_STEPS} steps, dt 0.02")
    print("| N | precision | stage solves | forward ms | grad ms | vs GMRES forward |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        if "failed" in r:
            reason = f"failed: {r['failed'][:70]}"
            print(f"| {r['n']}^2 | {r['precision']} | {r['solver']} | {reason} | | |")
            continue
        base = rows[i - (i % GROUP) + 1]  # the GMRES row of this size and precision
        speedup = base["forward_s"] / r["forward_s"]
        print(
            f"| {r['n']}^2 | {r['precision']} | {r['solver']} | "
            f"{1e3 * r['forward_s']:.1f} | {1e3 * r['grad_s']:.1f} | {speedup:.1f}x |"
        )
    print("\nCG against GMRES, largest difference relative to the largest value:")
    for r in rows:
        if "state_difference" in r:
            print(
                f"  {r['n']}^2 {r['precision']}: final state "
                f"{r['state_difference']:.1e}, diffusivity gradient "
                f"{r['gradient_difference']:.1e}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print_table(run(args.sizes, args.repeats))


if __name__ == "__main__":
    main()
