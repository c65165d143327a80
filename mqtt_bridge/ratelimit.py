"""Log lines about bad input, at most one per key per interval, with a count of what was suppressed."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimitedLog:
    """Remembers up to ``max_keys`` keys (oldest forgotten first), so hostile input cannot grow it."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log unless ``key`` was logged within the interval; returns whether it logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        if suppressed:
            self._logger.warning(message + " (%d more since the last line)", *args, suppressed)
        else:
            self._logger.warning(message, *args)
        return True
