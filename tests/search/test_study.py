"""Opening one new SQLite study from several processes at once: every one gets a working storage."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path


def _open_and_count(url: str, queue: "mp.Queue[int | str]") -> None:
    try:
        from slimkit.search.study import open_storage

        storage = open_storage(url)
        queue.put(len(storage.get_all_studies()))
    except Exception as exc:  # reported to the parent, which asserts on it
        queue.put(f"{type(exc).__name__}: {exc}")


def test_simultaneous_first_open_does_not_fail(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ctx = mp.get_context("spawn")
    queue: "mp.Queue[int | str]" = ctx.Queue()
    procs = [ctx.Process(target=_open_and_count, args=(url, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [0, 0, 0, 0], results
    assert all(p.exitcode == 0 for p in procs)
