"""Differentiable implicit PDE simulators with matrix-free implicit adjoints."""

from ._grid import Grid as Grid
from ._linear import DelegatingLinearSolver as DelegatingLinearSolver
from ._linear import KrylovCounter as KrylovCounter
from ._linear import ScaleInvariant as ScaleInvariant
from ._linear import solves_without_raising as solves_without_raising
from ._model import AbstractModel as AbstractModel
from ._model import AbstractSpectralModel as AbstractSpectralModel
from ._model import is_concrete as is_concrete
from ._models.advection_diffusion import AdvectionDiffusion as AdvectionDiffusion
from ._models.burgers import Burgers as Burgers
from ._models.kuramoto_sivashinsky import KuramotoSivashinsky as KuramotoSivashinsky
from ._models.lorenz96 import Lorenz96 as Lorenz96
from ._models.navier_stokes import NavierStokes2D as NavierStokes2D
from ._schemes.base import AbstractScheme as AbstractScheme
from ._schemes.diffrax_scheme import DiffraxScheme as DiffraxScheme
from ._schemes.explicit import RK4 as RK4
from ._schemes.imex import IMEXRungeKutta as IMEXRungeKutta
from ._schemes.theta import ImplicitMidpoint as ImplicitMidpoint
from ._schemes.theta import ThetaMethod as ThetaMethod
from ._schemes.theta import backward_euler as backward_euler
from ._schemes.theta import crank_nicolson as crank_nicolson
from ._simulator import Simulator as Simulator
from ._solve import NewtonKrylov as NewtonKrylov
