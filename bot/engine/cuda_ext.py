"""The project's own CUDA kernels, built at load by torch's extension builder.

Each extension (the row-layout 4-bit products, bot/engine/rowquant.py; the
decode attention, bot/engine/attention.py; the residual add + RMSNorm,
bot/engine/norm.py) is built once per source and torch version into
``$XWIN_KERNEL_DIR/<name>`` (default ``~/.cache/xwin-bot/kernels``) and
imported from there afterwards without a build step: a stamp file names the
sources' hash and torch's version that the library was built from. A process
loads each once (:func:`load` keeps what it loaded).

On a Hopper GPU or later their launches can be programmatic dependent
launches (:func:`set_dependent_launch`; ``dependent_launch.cuh``): a kernel
of a decode step starts while the one before it finishes, and a row kernel
loads its first weights before it waits for its input, where each kernel
otherwise starts only once the last has ended and then waits for its first
bytes (a one-row step at 80 layers is ~800 kernels).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_loaded: dict[str, Any] = {}  # name -> the extension this process loaded
_dependent = False  # their launches are dependent ones (set_dependent_launch)


def dependent_launch_supported(device: torch.device) -> bool:
    """Programmatic dependent launch takes this device: a Hopper GPU or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def set_dependent_launch(on: bool) -> None:
    """Every extension's launches (those loaded and those loaded later) as
    programmatic dependent launches, or plain ones. The caller checks
    :func:`dependent_launch_supported`; graphs captured before keep the
    launches they were captured with."""
    global _dependent
    _dependent = on
    for ext in _loaded.values():
        ext.set_dependent_launch(on)


def source_hash(sources: Sequence[Path]) -> str:
    """The sources' contents, hashed: what a build's stamp names."""
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()


def kernel_dir() -> Path:
    return Path(os.environ.get("XWIN_KERNEL_DIR") or Path.home() / ".cache" / "xwin-bot" / "kernels")


def load(name: str, main: Path, sources: Sequence[Path], what: str) -> Any:
    """The extension ``xwin_<name>`` compiled from ``main`` (which includes
    the rest of ``sources``): the one this process loaded already, else
    imported if built from these sources, else built."""
    if name in _loaded:
        return _loaded[name]
    _loaded[name] = ext = _import_or_build(name, main, sources, what)
    ext.set_dependent_launch(_dependent)
    return ext


def _import_or_build(name: str, main: Path, sources: Sequence[Path], what: str) -> Any:
    build = kernel_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    stamp = f"{source_hash(sources)} torch {torch.__version__}"
    library = build / f"xwin_{name}.so"
    if library.exists() and (build / "stamp").exists() and (build / "stamp").read_text() == stamp:
        spec = importlib.util.spec_from_file_location(f"xwin_{name}", library)
        assert spec is not None and spec.loader is not None
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        return ext
    # Not built from these sources (the stamp compares contents; ninja compares times, and
    # a kernel folder shared by checkouts or carried between machines can be newer): rebuild.
    for stale in (*build.glob("*.o"), *build.glob("*.so")):
        stale.unlink()
    from torch.utils.cpp_extension import load as build_extension

    t0 = time.perf_counter()
    ext = build_extension(
        name=f"xwin_{name}", sources=[str(main)], build_directory=str(build), extra_cuda_cflags=["-O3"], verbose=False
    )
    (build / "stamp").write_text(stamp)
    log.info("built the %s in %.0f s (%s)", what, time.perf_counter() - t0, build)
    return ext
