"""Learned variational data assimilation on top of `simulators`.

The assimilation layer (observations, cost functions, solvers, unrolled networks) is
built in later issues; this package currently holds the I/O helpers and the CLI.
"""

from ._io import write_json as write_json
from ._io import write_netcdf as write_netcdf
