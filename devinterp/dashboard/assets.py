"""The page's HTML templates, stylesheet and scripts, read from ``static/`` in this package.

They are real files (``static/*.html``, ``style.css``, ``*.js``) so editors and linters see
HTML, CSS and JavaScript, and are read once with :mod:`importlib.resources`, which finds them
in a wheel as in a checkout. Templates hold ``%NAME%`` placeholders that
:func:`devinterp.dashboard.page.fill` replaces in one pass.

The scripts only lay out the page model (see :mod:`devinterp.dashboard.page`): figures are
drawn as built in Python, and every string from a run is written with ``textContent``, never
as HTML (``helpers.js``, shared by both scripts). ``window.__dashboard`` reports when the page
has drawn (tests and the benchmark wait for ``ready``) and how many times it re-rendered after
polling.
"""

from __future__ import annotations

from importlib.resources import files

#: Where a script takes the shared DOM helpers.
_HELPERS_MARK = "  // @helpers (helpers.js, inserted when the package loads)\n"


def _read(name: str) -> str:
    return files("devinterp.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def _script(name: str) -> str:
    text = _read(name)
    if text.count(_HELPERS_MARK) != 1:
        raise RuntimeError(f"static/{name} must hold the helpers mark once; the package is "
                           "damaged: reinstall devinterp")
    return text.replace(_HELPERS_MARK, _read("helpers.js"))


_HEAD = _read("head.html")
PAGE_TEMPLATE = _HEAD + _read("page.html")
INDEX_TEMPLATE = _HEAD + _read("index.html")
STYLE = _read("style.css")
SCRIPT = _script("page.js")
INDEX_SCRIPT = _script("index.js")
