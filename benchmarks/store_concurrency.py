"""Several processes writing one LogitStore at once: the concurrency contract, checked.

Each round creates a fresh store; ``--writers`` processes (started once, kept
for every round) wait at a barrier, then all add images at the same moment:

- ``--mode same``: every writer adds the same ``--names`` names. Exactly one
  writer must commit each name; the others must be refused with an error that
  names the image and the store.
- ``--mode overwrite``: the same, with ``overwrite=True``: every call succeeds
  and the last commit wins.
- ``--mode disjoint``: each writer its own names; every call must succeed.

A writer ``w`` writes logits whose first class plane is ``w`` everywhere and
labels equal to ``w``: after the round, an image whose two arrays disagree on
the writer is a mixed image. The store must also pass ``verify()`` and, after
``clean(grace_seconds=0)``, have no stray files.

Usage::

    python benchmarks/store_concurrency.py --rounds 300 --mode same   # ~1 min on tmpfs
    python benchmarks/store_concurrency.py --rounds 3 --json          # what the tests run

Prints one JSON line (with ``--json``) or a short summary; exit status 1 when
any check failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_CLASSES = 4
SIZE = (6, 5)


def _arrays(writer: int, name: int):
    import numpy as np

    rng = np.random.default_rng(1000 * writer + name)
    z = rng.normal(size=(N_CLASSES, *SIZE)).astype(np.float32)
    z[0] = writer
    return z, np.full(SIZE, writer, dtype=np.int64)


def _names(mode: str, writer: int, n_names: int) -> list[int]:
    if mode == "disjoint":
        return list(range(writer * n_names, (writer + 1) * n_names))
    return list(range(n_names))


def _writer(writer, mode, n_names, barrier, jobs, results):
    from sksegcal.store import LogitStore

    while True:
        path = jobs.get()
        if path is None:
            return
        store = LogitStore.open(path)
        names = _names(mode, writer, n_names)
        prepared = [(name, *_arrays(writer, name)) for name in names]
        barrier.wait()
        ok, refused, bad_messages = [], [], []
        for name, z, t in prepared:
            try:
                store.add_image(name, z, t, overwrite=mode == "overwrite")
                ok.append(name)
            except ValueError as exc:
                refused.append(name)
                text = str(exc)
                if repr(name) not in text or str(store.path) not in text:
                    bad_messages.append(text)
        barrier.wait()
        results.put((writer, ok, refused, bad_messages))


def run(root: Path, rounds: int, n_names: int, n_writers: int, mode: str) -> dict:
    import numpy as np

    from sksegcal.store import LogitStore

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_writers)
    jobs = [ctx.Queue() for _ in range(n_writers)]
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(w, mode, n_names, barrier, jobs[w], results))
        for w in range(n_writers)
    ]
    for p in procs:
        p.start()
    failures: list[str] = []
    totals = {"images": 0, "refused": 0, "strays_cleaned": 0}
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            path = root / f"round{r}"
            LogitStore.create(path, n_classes=N_CLASSES, ignore_index=None)
            for q in jobs:
                q.put(str(path))
            outcome = [results.get(timeout=120) for _ in range(n_writers)]
            store = LogitStore.open(path)
            winners: dict[int, list[int]] = {}
            for writer, ok, refused, bad in outcome:
                totals["refused"] += len(refused)
                failures += [f"round {r}: unclear refusal: {m}" for m in bad[:1]]
                for name in ok:
                    winners.setdefault(name, []).append(writer)
            expected = sorted({n for w in range(n_writers) for n in _names(mode, w, n_names)})
            if store.image_names != expected:
                failures.append(f"round {r}: images {store.image_names} != {expected}")
            for img in store.iter_images():
                totals["images"] += 1
                w_logits = np.unique(np.asarray(img.logits[0], dtype=np.float32))
                w_labels = np.unique(np.asarray(img.labels))
                if len(w_logits) != 1 or w_logits.tolist() != w_labels.tolist():
                    failures.append(
                        f"round {r}: image {img.name} mixed: logits of writer "
                        f"{w_logits.tolist()}, labels of {w_labels.tolist()}"
                    )
                    continue
                z, _ = _arrays(int(w_labels[0]), img.name)
                if not np.array_equal(np.asarray(img.logits), z.astype(np.float16)):
                    failures.append(f"round {r}: image {img.name}: logits not its writer's")
                who = winners.get(img.name, [])
                if mode != "overwrite" and who != [int(w_labels[0])]:
                    failures.append(
                        f"round {r}: image {img.name} committed by {int(w_labels[0])}, "
                        f"writers that reported success: {who}"
                    )
            try:
                store.verify()
            except ValueError as exc:
                failures.append(f"round {r}: verify: {exc}")
            totals["strays_cleaned"] += len(store.clean(grace_seconds=0))
            try:
                if store.verify(checksums=False)["stray_files"]:
                    failures.append(f"round {r}: strays left after clean()")
            except ValueError:
                pass  # reported above
            shutil.rmtree(path)
            if len(failures) > 20:
                break
    finally:
        for q in jobs:
            q.put(None)
        for p in procs:
            p.join(timeout=30)
    return {
        "mode": mode,
        "rounds": rounds,
        "writers": n_writers,
        "names": n_names,
        "seconds": round(time.perf_counter() - t0, 2),
        **totals,
        "n_failures": len(failures),
        "failures": failures[:10],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--names", type=int, default=60)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--mode", choices=["same", "overwrite", "disjoint"], default="same")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the stores go (default: /dev/shm when present, else tmp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = args.dir
    if base is None and Path("/dev/shm").is_dir():
        base = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="store-concurrency-", dir=base))
    try:
        report = run(root, args.rounds, args.names, args.writers, args.mode)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['mode']}: {report['rounds']} rounds x {report['writers']} writers x "
            f"{report['names']} names in {report['seconds']} s; {report['images']} images "
            f"checked, {report['refused']} refusals, {report['strays_cleaned']} strays "
            f"cleaned, {report['n_failures']} failures"
        )
        for line in report["failures"]:
            print("  " + line)
    return 1 if report["n_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
