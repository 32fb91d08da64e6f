"""``devinterp.callback.LLCCallback``, the class path ``configs/*.yaml`` and older scripts use;
the callback lives in :mod:`devinterp.tracking.callback`."""

from devinterp.tracking.callback import LLCCallback

__all__ = ["LLCCallback"]
