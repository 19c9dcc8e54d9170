"""Progress of a long LLM stage: prompts done, the LLM's requests done and per second, and the time left."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from tqdm import tqdm


class LLMProgress:
    """Counts finished work items (prompts, users) of a stage; each may cost one or more LLM requests.

    On a terminal, a tqdm bar (items, with requests and requests/s beside it, and tqdm's ETA); `say`, when
    given, also gets a line at every tenth of the way, so logs (a ClientApp's) show the pace as well.
    Requests = model calls + cache hits since the stage began; lines say how many of them the cache answered.
    """

    def __init__(self, stats, total: int, what: str, unit: str = "prompt", say: Callable[[str], None] | None = None):
        self.stats, self.total, self.what, self.unit, self.say = stats, total, what, unit, say
        self.before = stats.copy()
        self.t0 = time.perf_counter()
        self.done = 0
        self._next_line = 1
        self._lock = threading.Lock()
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, mininterval=1.0, leave=False,
                        disable=None if total > 1 else True, dynamic_ncols=True)

    def requests(self) -> tuple[int, int]:
        """(requests, of them answered by the cache) since the stage began."""
        used = self.stats.minus(self.before)
        return used.calls + used.cache_hits, used.cache_hits

    def step(self) -> None:
        """One work item finished (called from any thread)."""
        with self._lock:
            self.done += 1
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            requests, hits = self.requests()
            self.bar.set_postfix_str(f"{requests} requests ({hits} cached), {requests / elapsed:.1f} req/s",
                                     refresh=False)
            self.bar.update(1)
            if self.say and self.done * 10 >= self._next_line * self.total:
                self._next_line = self.done * 10 // self.total + 1
                left = elapsed / self.done * (self.total - self.done)
                self.say(f"{self.what}: {self.done}/{self.total} {self.unit}s, {requests} LLM requests ({hits} from "
                         f"the cache, {requests / elapsed:.1f}/s), about {tqdm.format_interval(left)} left")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "LLMProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
