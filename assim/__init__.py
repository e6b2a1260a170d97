"""Learned variational data assimilation on top of `simulators`.

So far: observation files (open lazily, validate, read window by window), `B` through
its square root (diagonal, diffusion-correlated), 3D/4D-Var with joint parameter
estimation minimised by L-BFGS, scores (RMSE, mu, effective resolution, innovation
statistics), atomic writers and the `assim-simulate` CLI.
Incremental 4D-Var, cycling, diagnostics, `assim-run` and unrolled networks come next.
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
