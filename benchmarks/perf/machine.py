"""The machine the benchmark ran on: CPUs, memory, versions, GPU."""

from __future__ import annotations

import os
import platform
import shutil

from benchmarks.perf.common import GIB


def total_memory() -> int:
    """The machine's memory in bytes."""
    import psutil

    return int(psutil.virtual_memory().total)


def cuda_device() -> str | None:
    """The name of the GPU torch sees in this process (None: none)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational
        return None


def gpu_line() -> str:
    """Whether a GPU was visible to this process and to nvidia-smi."""
    name = cuda_device()
    smi = shutil.which("nvidia-smi")
    if name:
        return (f"GPU: {name} visible to torch; the runs above used CPU settings "
                "(num_gpus_per_client=0).")
    return ("GPU: none. `torch.cuda.is_available()` is "
            f"False{'' if smi else ' and there is no nvidia-smi'} on this machine, so every figure "
            "is CPU-only; no GPU machine was available to this benchmark. The GPU paths (actors "
            "with `num_gpus_per_client`, bf16 weights on CUDA) are not measured here.")


def machine_line() -> str:
    """Platform, CPUs, memory, Python and the versions of the main libraries."""
    import psutil

    versions = []
    for mod in ("torch", "ray", "transformers", "peft"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            continue
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM, Python "
            f"{platform.python_version()}, " + ", ".join(versions))
