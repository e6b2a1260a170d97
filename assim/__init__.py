"""Learned variational data assimilation on top of `simulators`.

- Observations: `open_observations`, `ObservationSet`, `iter_windows`, archives
  larger than memory (`open_archive`, `WindowStream`), operators (`GridSelection`,
  `LinearInterpolation`).
- The window problem: `WindowProblem` (simulator, `B`, optional `Q`, parameter
  prior, extra cost terms) with its controls (`Control`, `Analysis`), covariances
  (`DiagonalCovariance`, `DiffusionCovariance`, `SpectralCovariance`, a model's
  `Climatology`), the bounded-log `Parameter`, cost terms (`StateBounds`,
  `ConservedTotal`, `KnownValues`, `ParameterBounds`: constraints a user adds at
  inference), non-smooth priors (`TotalVariation`, `L1Prior`).
- Analysers, `analyser(problem, window, background) -> (analysis, info)`:
  `Variational` (3D-Var, strong- / weak-constraint 4D-Var, joint parameter
  estimation; `incremental` Gauss-Newton or any optimistix solver),
  `ProximalGradient` and `ADMM` (with a non-smooth prior), `Refined` (any
  analyser's output refined by a variational solver), `NoUpdate`
  (the background: climatology, free run), `UnrolledVar`,
  `UnrolledGaussNewton`, `UnrolledADMM` (unrolled networks), `BilevelVar`
  (4D-Var with implicit hypergradients), ensemble filters (`EnKF`, `ETKF`,
  `LETKF`, whose background is an `Ensemble`) and hybrid ensemble-variational
  4D-Var (`HybridEnVar` with a `HybridCovariance`).
- Running them: `cycle` (cycled windows, sliding windows, error scales adapted
  from innovations by `InnovationAdaptation`) and `assimilate` (independent
  windows, batched over devices), `Scores`, `AnalysisWriter` (NetCDF).
- Learning: losses (`Supervised`, `Masking`, `Residual`, `Cost`, `Evidence`,
  summed by `WeightedLoss`), `train` with `TrainSettings`, checkpoints.
- Scale: `batch_mesh`, `map_windows`, `initialize_distributed`.
"""

from ._adaptive import AdaptationState as AdaptationState
from ._adaptive import InnovationAdaptation as InnovationAdaptation
from ._analyser import OUTCOMES as OUTCOMES
from ._analyser import AbstractAnalyser as AbstractAnalyser
from ._analyser import Info as Info
from ._analyser import NoUpdate as NoUpdate
from ._batch import Batch as Batch
from ._batch import obs_mean_background as obs_mean_background
from ._batch import windows_batch as windows_batch
from ._bilevel import BilevelVar as BilevelVar
from ._bilevel import ReverseImplicitAdjoint as ReverseImplicitAdjoint
from ._covariance import AbstractCovariance as AbstractCovariance
from ._covariance import Climatology as Climatology
from ._covariance import DiagonalCovariance as DiagonalCovariance
from ._covariance import DiffusionCovariance as DiffusionCovariance
from ._covariance import ScaledCovariance as ScaledCovariance
from ._covariance import SpectralCovariance as SpectralCovariance
from ._covariance import climatological_covariance as climatological_covariance
from ._cycle import ForecastFailed as ForecastFailed
from ._cycle import WindowResult as WindowResult
from ._cycle import WindowsFailed as WindowsFailed
from ._cycle import analyse_window as analyse_window
from ._cycle import assimilate as assimilate
from ._cycle import cycle as cycle
from ._ensemble import ETKF as ETKF
from ._ensemble import LETKF as LETKF
from ._ensemble import AbstractEnsembleAnalyser as AbstractEnsembleAnalyser
from ._ensemble import AbstractEnsembleFilter as AbstractEnsembleFilter
from ._ensemble import EnKF as EnKF
from ._ensemble import Ensemble as Ensemble
from ._ensemble import HybridCovariance as HybridCovariance
from ._ensemble import HybridEnVar as HybridEnVar
from ._ensemble import gaspari_cohn as gaspari_cohn
from ._ensemble import gaspari_cohn_correlation as gaspari_cohn_correlation
from ._layers import UnrolledADMM as UnrolledADMM
from ._layers import UnrolledGaussNewton as UnrolledGaussNewton
from ._losses import AbstractLoss as AbstractLoss
from ._losses import Cost as Cost
from ._losses import Evidence as Evidence
from ._losses import Masking as Masking
from ._losses import Residual as Residual
from ._losses import Supervised as Supervised
from ._losses import Term as Term
from ._losses import WeightedLoss as WeightedLoss
from ._losses import batch_loss as batch_loss
from ._losses import denoising_loss as denoising_loss
from ._losses import hide as hide
from ._losses import refine_analysis as refine_analysis
from ._metrics import Scores as Scores
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
from ._observations import bundled_dataset as bundled_dataset
from ._observations import iter_windows as iter_windows
from ._observations import open_observations as open_observations
from ._observations import quality_control as quality_control
from ._operators import AbstractObservationOperator as AbstractObservationOperator
from ._operators import GridSelection as GridSelection
from ._operators import LinearInterpolation as LinearInterpolation
from ._parallel import batch_mesh as batch_mesh
from ._parallel import initialize_distributed as initialize_distributed
from ._parallel import map_windows as map_windows
from ._priors import AbstractPrior as AbstractPrior
from ._priors import L1Prior as L1Prior
from ._priors import TotalVariation as TotalVariation
from ._problem import AbstractCostTerm as AbstractCostTerm
from ._problem import Analysis as Analysis
from ._problem import ConservedTotal as ConservedTotal
from ._problem import Control as Control
from ._problem import KnownValues as KnownValues
from ._problem import Parameter as Parameter
from ._problem import ParameterBounds as ParameterBounds
from ._problem import StateBounds as StateBounds
from ._problem import WindowProblem as WindowProblem
from ._problem import bounded_log as bounded_log
from ._proximal import ADMM as ADMM
from ._proximal import ProximalGradient as ProximalGradient
from ._runtime import runtime_summary as runtime_summary
from ._stream import WindowStream as WindowStream
from ._stream import archive_files as archive_files
from ._stream import open_archive as open_archive
from ._stream import split_windows as split_windows
from ._train import TrainingStopped as TrainingStopped
from ._train import TrainSettings as TrainSettings
from ._train import cycled_backgrounds as cycled_backgrounds
from ._train import evaluate as evaluate
from ._train import load_checkpoint as load_checkpoint
from ._train import save_checkpoint as save_checkpoint
from ._train import train as train
from ._unrolled import AbstractWindowNet as AbstractWindowNet
from ._unrolled import UnrolledVar as UnrolledVar
from ._variational import IncrementalGaussNewton as IncrementalGaussNewton
from ._variational import Refined as Refined
from ._variational import Variational as Variational
from ._variational import incremental as incremental
from ._writer import AnalysisWriter as AnalysisWriter
from ._writer import analysis_dataset as analysis_dataset
