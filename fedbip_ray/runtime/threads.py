"""This process's BLAS / OpenMP thread pools (the server actor runs its products on
``resources.server_cpus`` threads)."""

from __future__ import annotations

import os


def set_blas_threads(threads: int) -> int:
    """Limit this process's BLAS / OpenMP pools to ``threads`` (>= 1): the environment for
    libraries loaded later, threadpoolctl for those already loaded (numpy's OpenBLAS).
    Returns the count applied."""
    n = max(1, int(threads))
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it only libraries loaded from now on follow the variables
        return n
    threadpool_limits(limits=n)
    return n


def blas_threads() -> int:
    """This process's largest BLAS / OpenMP pool (``OMP_NUM_THREADS`` without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    return max((int(i["num_threads"]) for i in threadpool_info()), default=1)
