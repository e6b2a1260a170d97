"""Learned variational data assimilation on top of `simulators`.

So far: observation files (open lazily, validate, read window by window), atomic
writers and the `assim-simulate` CLI. Cost functions, solvers and unrolled networks
come next.
"""

from ._io import write_json as write_json
from ._io import write_netcdf as write_netcdf
from ._observations import ObservationError as ObservationError
from ._observations import ObservationSet as ObservationSet
from ._observations import iter_windows as iter_windows
from ._observations import open_observations as open_observations
