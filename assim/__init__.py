"""Learned variational data assimilation on top of `simulators`.

Observation files (open lazily, validate, read window by window) and operators
(grid selection, linear interpolation), background covariances through their square
roots (diagonal, diffusion-correlated, spectral), 3D-Var and strong- / weak-constraint
4D-Var with joint parameter estimation, L-BFGS and incremental Gauss-Newton solvers,
cycling, scores, twin experiments, atomic writers and the CLIs (`assim-run`,
`assim-data`, `assim-simulate`). Unrolled variational networks (`UnrolledVar`), bilevel
4D-Var with implicit hypergradients (`BilevelVar`), their
losses and their training (`train`, `assim-train`). Data parallelism over devices and
hosts (`batch_mesh`, `map_windows`), archives larger than memory (`open_archive`,
`WindowStream`).
"""

from ._bilevel import BilevelVar as BilevelVar
from ._covariance import AbstractCovariance as AbstractCovariance
from ._covariance import DiagonalCovariance as DiagonalCovariance
from ._covariance import DiffusionCovariance as DiffusionCovariance
from ._covariance import SpectralCovariance as SpectralCovariance
from ._cycle import AnalysisWriter as AnalysisWriter
from ._cycle import WindowResult as WindowResult
from ._cycle import analysis_dataset as analysis_dataset
from ._cycle import assimilate_var_windows as assimilate_var_windows
from ._cycle import assimilate_windows as assimilate_windows
from ._cycle import cycle as cycle
from ._cycle import cycle_unrolled as cycle_unrolled
from ._cycle import iter_cycle as iter_cycle
from ._cycle import iter_cycle_unrolled as iter_cycle_unrolled
from ._io import write_json as write_json
from ._io import write_netcdf as write_netcdf
from ._losses import Batch as Batch
from ._losses import batch_loss as batch_loss
from ._losses import cost_loss as cost_loss
from ._losses import denoising_loss as denoising_loss
from ._losses import evidence_loss as evidence_loss
from ._losses import hide as hide
from ._losses import masking_loss as masking_loss
from ._losses import refine_analysis as refine_analysis
from ._losses import residual_loss as residual_loss
from ._losses import supervised_loss as supervised_loss
from ._losses import window_loss as window_loss
from ._metrics import effective_resolution as effective_resolution
from ._metrics import error_spectra as error_spectra
from ._metrics import innovation_statistics as innovation_statistics
from ._metrics import mu_score as mu_score
from ._metrics import resolution_from_spectra as resolution_from_spectra
from ._metrics import rmse as rmse
from ._networks import ConvLSTMSolver as ConvLSTMSolver
from ._networks import ConvNet as ConvNet
from ._networks import NeuralCorrection as NeuralCorrection
from ._networks import PlugAndPlayPrior as PlugAndPlayPrior
from ._networks import ProximalPrior as ProximalPrior
from ._networks import WarmStart as WarmStart
from ._observations import ObservationError as ObservationError
from ._observations import ObservationSet as ObservationSet
from ._observations import iter_windows as iter_windows
from ._observations import open_observations as open_observations
from ._operators import AbstractObservationOperator as AbstractObservationOperator
from ._operators import GridSelection as GridSelection
from ._operators import LinearInterpolation as LinearInterpolation
from ._parallel import batch_mesh as batch_mesh
from ._parallel import batch_sharding as batch_sharding
from ._parallel import gather as gather
from ._parallel import initialize_distributed as initialize_distributed
from ._parallel import map_windows as map_windows
from ._parallel import pad_batch as pad_batch
from ._parallel import replicate as replicate
from ._parallel import shard_batch as shard_batch
from ._stream import WindowStream as WindowStream
from ._stream import archive_files as archive_files
from ._stream import open_archive as open_archive
from ._stream import prefetch as prefetch
from ._train import TrainingStopped as TrainingStopped
from ._train import TrainSettings as TrainSettings
from ._train import TrainState as TrainState
from ._train import evaluate as evaluate
from ._train import init_state as init_state
from ._train import load_checkpoint as load_checkpoint
from ._train import obs_mean_background as obs_mean_background
from ._train import read_header as read_header
from ._train import save_checkpoint as save_checkpoint
from ._train import train as train
from ._train import windows_batch as windows_batch
from ._unrolled import AbstractWindowNet as AbstractWindowNet
from ._unrolled import UnrolledVar as UnrolledVar
from ._var import Control as Control
from ._var import ModelErrorForcing as ModelErrorForcing
from ._var import SolveInfo as SolveInfo
from ._var import Var4D as Var4D
from ._var import bounded_log as bounded_log
from ._var import make_solver as make_solver
from ._var import minimise as minimise
from ._var import solve_window as solve_window
