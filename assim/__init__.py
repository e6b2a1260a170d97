"""Learned variational data assimilation on top of `simulators`.

Observation files (open lazily, validate, read window by window) and operators
(grid selection, linear interpolation), background covariances through their square
roots (diagonal, diffusion-correlated, spectral), 3D-Var and strong- / weak-constraint
4D-Var with joint parameter estimation, L-BFGS and incremental Gauss-Newton solvers,
cycling, scores, twin experiments, atomic writers and the CLIs (`assim-run`,
`assim-data`, `assim-simulate`). Unrolled networks come next.
"""

from ._covariance import AbstractCovariance as AbstractCovariance
from ._covariance import DiagonalCovariance as DiagonalCovariance
from ._covariance import DiffusionCovariance as DiffusionCovariance
from ._covariance import SpectralCovariance as SpectralCovariance
from ._cycle import WindowResult as WindowResult
from ._cycle import analysis_dataset as analysis_dataset
from ._cycle import cycle as cycle
from ._io import write_json as write_json
from ._io import write_netcdf as write_netcdf
from ._metrics import effective_resolution as effective_resolution
from ._metrics import innovation_statistics as innovation_statistics
from ._metrics import mu_score as mu_score
from ._metrics import rmse as rmse
from ._observations import ObservationError as ObservationError
from ._observations import ObservationSet as ObservationSet
from ._observations import iter_windows as iter_windows
from ._observations import open_observations as open_observations
from ._operators import AbstractObservationOperator as AbstractObservationOperator
from ._operators import GridSelection as GridSelection
from ._operators import LinearInterpolation as LinearInterpolation
from ._var import Control as Control
from ._var import ModelErrorForcing as ModelErrorForcing
from ._var import SolveInfo as SolveInfo
from ._var import Var4D as Var4D
from ._var import bounded_log as bounded_log
from ._var import make_solver as make_solver
from ._var import minimise as minimise
