"""`python -m bench [NAME ...]`: run every bench/*.py that has a `main()` (or the named ones).

Each module prints its own lines, "name: ours N / yardstick M = ratio". A module that fails is
reported and the others still run; the exit code says whether all of them finished.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def modules() -> list[str]:
    """bench/*.py in name order, without the package files."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    names = argv or modules()
    unknown = [n for n in names if n not in modules()]
    if unknown:
        print(f"bench: no module {', '.join(unknown)}; have {', '.join(modules())}",
              file=sys.stderr)
        return 2
    failed = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        run = getattr(module, "main", None)
        if not callable(run):
            continue
        started = time.monotonic()
        print(f"# bench/{name}.py", flush=True)
        try:
            run()
        except Exception:  # report and go on with the other benchmarks
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
            failed.append(name)
        print(f"# bench/{name}.py took {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
