"""First start against later starts of ``xwin-bot chat --model embedded``.

    PYTHONPATH=. .venv/bin/python -m bench.embedded_start [--starts 3]

Runs the real command as a newcomer does, one question piped in (replies
capped at :data:`MAX_NEW_TOKENS`), with a fresh
cache folder (``XDG_CACHE_HOME``) and a fresh database for each start: the
first start converts the GGUF, the later ones load the converted copy. For
each start, from the moment the process is spawned: when the model was
loaded (the engine's own log line), when the reply was printed, when the
process ended. Prints a table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
#: Piped, the reply is printed whole: a short cap keeps the reply time about the start.
MAX_NEW_TOKENS = 32


def one_start(workdir: Path, cache: Path, n: int) -> dict[str, float | str]:
    config = workdir / f"config-{n}.toml"
    config.write_text(f'[bot]\ndatabase = "bot-{n}.sqlite3"\n[generation]\nmax_new_tokens = {MAX_NEW_TOKENS}\n',
                      encoding="utf-8")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bot.main", "chat", "--model", "embedded", "-v",
                             "--config", str(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=workdir, env=env)
    marks: dict[str, float | str] = {}

    def watch_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Converting" in line and "converted" not in marks:
                marks["converted"] = "yes"
            if m := re.search(r"loaded embedded on \S+ \(\S+\) in ([\d.]+) s", line):
                marks["loaded_s"] = time.perf_counter() - started
                marks["load_logged_s"] = float(m.group(1))

    watcher = threading.Thread(target=watch_stderr)
    watcher.start()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(QUESTION + "\n")
    proc.stdin.close()
    reply = proc.stdout.readline()
    marks["reply_s"] = time.perf_counter() - started
    proc.stdout.read()
    proc.wait(timeout=600)
    watcher.join()
    marks["exit_s"] = time.perf_counter() - started
    marks["reply"] = reply.strip()
    marks.setdefault("converted", "no")
    if proc.returncode != 0:
        raise SystemExit(f"start {n} failed with {proc.returncode}")
    return marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        rows = [one_start(work, cache, n) for n in range(1, args.starts + 1)]
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"`{' '.join(['python', '-m', 'bench.embedded_start', *sys.argv[1:]])}`")
    print("| start | converted the GGUF | model loaded (log / since spawn) | reply printed | process ended |")
    print("|---|---|---|---|---|")
    for n, row in enumerate(rows, 1):
        print(f"| {n} | {row['converted']} | {row['load_logged_s']:.1f} s / {row['loaded_s']:.1f} s "
              f"| {row['reply_s']:.1f} s | {row['exit_s']:.1f} s |")
    for n, row in enumerate(rows, 1):
        print(f"reply {n}: {row['reply']!r}")


if __name__ == "__main__":
    main()
