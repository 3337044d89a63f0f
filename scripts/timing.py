"""Step timing shared by scripts/benchmark.py and scripts/bench_timm.py
(plain Python: it also runs in the separate torch environment)."""
import time
from typing import Callable, List, Tuple


def timed_windows(run: Callable[[int], None], steps: int, windows: int = 0
                  ) -> Tuple[List[float], List[float]]:
  """Splits `steps` into windows (default min(steps, 5)) and times each.

  `run(n)` takes n steps and returns once their results are ready. Returns
  per-step wall seconds and per-step process CPU seconds of every window.
  """
  windows = max(1, min(windows or min(steps, 5), steps))
  per_window = [steps // windows + (i < steps % windows)
                for i in range(windows)]
  times, cpu_times = [], []
  for n in per_window:
    t, c = time.perf_counter(), time.process_time()
    run(n)
    times.append((time.perf_counter() - t) / n)
    cpu_times.append((time.process_time() - c) / n)
  return times, cpu_times
