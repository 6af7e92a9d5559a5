"""``python -m benchmarks.perf``: see :mod:`benchmarks.perf.run`."""

from benchmarks.perf.run import main

if __name__ == "__main__":
    main()
