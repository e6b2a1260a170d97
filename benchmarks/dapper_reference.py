"""DAPPER's own implementations on the settings of `bench_assimilation.py`, for a side
by side check of the published figures (run in a separate environment:
`pip install dapper==1.7.1`, then `python benchmarks/dapper_reference.py`).

DAPPER 1.7.1's `Var4D` calls the observation operator with the time index in place of
the state (`Obs(ko).linear(x)`, an IndexError); this script fixes those two calls in
the installed source at import time and changes nothing else.
"""

import inspect

import dapper as dpr
import dapper.da_methods as da
import dapper.da_methods.variational as variational


def _fixed_var4d():
    """`Var4D` re-defined from the installed module's source with the two calls
    fixed (the module is re-executed in its own namespace)."""
    source = inspect.getsource(variational)
    fixed = source.replace("Obs(ko).linear(x)", "Obs.linear(x)").replace(
        "xo = Obs(ko)(x)", "xo = Obs(x)"
    )
    exec(compile(fixed, variational.__file__, "exec"), vars(variational))
    return variational.Var4D


def main():
    Var4D = _fixed_var4d()
    from dapper.mods.KS.bocquet2019 import HMM as KS
    from dapper.mods.Lorenz96.sakov2008 import HMM as L96

    L96.tseq = dpr.mods.Chronology(0.05, dko=1, Ko=1000, BurnIn=10)
    xps = dpr.xpList([da.Climatology(), da.OptInterp(), da.Var3D(xB=0.02)])
    xps.launch(L96, liveplots=False, fail_gently=False, store_u=False)
    print("Lorenz-96, dt_obs 0.05\n", xps.tabulate_avrgs(["rmse.a"]))

    # The xB values next to the published 4D-Var figures in sakov2008.py.
    L96.tseq = dpr.mods.Chronology(0.05, dko=4, Ko=300, BurnIn=10)
    xps = dpr.xpList(
        [Var4D(Lag=1, xB=0.2), Var4D(Lag=2, xB=0.1), Var4D(Lag=4, xB=0.02)]
    )
    xps.launch(L96, liveplots=False, fail_gently=False, store_u=False)
    print("Lorenz-96, dt_obs 0.2\n", xps.tabulate_avrgs(["rmse.a"]))

    KS.tseq = dpr.mods.Chronology(0.5, dko=2, Ko=3000, BurnIn=100)
    xps = dpr.xpList([da.Climatology(), da.OptInterp()])
    xps.launch(KS, liveplots=False, fail_gently=False, store_u=False)
    print("Kuramoto-Sivashinsky, dt_obs 1\n", xps.tabulate_avrgs(["rmse.a"]))


if __name__ == "__main__":
    main()
