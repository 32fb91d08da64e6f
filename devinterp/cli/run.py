"""``devinterp run CONFIG.yaml [overrides]``: train a config-driven experiment, end to end.

One command does the whole chain into one run directory: training (LightningCLI reads the YAML:
``model`` / ``trainer`` with ``class_path`` / ``init_args``, ``seed_everything``), λ̂ during
training (the ``devinterp.LLCCallback`` listed under ``trainer.callbacks``, its ``dirpath`` set to
the run directory), stage detection at the end (``stages.json``) and the dashboard
(``dashboard.html``). Overrides use LightningCLI's syntax, e.g. ``--trainer.max_steps=100
--model.init_args.lr=0.1``.

Run directory (``--run-dir DIR``, default ``runs/<config name>-<timestamp>``)::

    config.yaml       the resolved config: every default filled in, the seed actually used
    llc.csv, metrics.csv, settings.json, run.json, snapshots/, traces/   (LLCCallback, run store)
    stages.json       developmental stages (devinterp.stages)
    dashboard.html    the dashboard of this run (devinterp.dashboard)
    logs/             the CSVLogger's files (the default logger; the config may set another)

A sweep, ``--sweep KEY=V1,V2,...`` (repeatable: the Cartesian product), runs every combination in
its own directory under the run directory (``KEY=V`` names it; ``seed`` means
``seed_everything``) and writes ``summary.csv`` (final loss, final λ̂, number of stages per run)
and a ``dashboard.html`` comparing the runs. Every combination is validated before the first
one trains. The run directory is the last line printed on stdout.

A config's ``class_path`` modules are imported from where the config lives: the repository's
``experiments`` package is not installed with devinterp, so before LightningCLI resolves class
paths the folder holding the config (the folder above it for a config in ``configs/``: the
repository root) is appended to ``sys.path`` (:func:`add_config_roots`), as is the current
directory (:func:`devinterp.cli.main`). A config elsewhere that names ``experiments.*`` needs
the repository on ``PYTHONPATH`` or as the current directory.

``--threads N`` runs torch, OpenMP and BLAS on N threads and overrides the config's
``torch_threads``. Option names are never abbreviated (``--trainer.max_step`` is an error
that suggests ``--trainer.max_steps``). The checks that need no torch (the flags, the config
file exists and is YAML, the run directory is new or empty) run before torch and Lightning are
imported (:mod:`devinterp.cli._lightning`), so those mistakes are reported at once.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import itertools
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devinterp.cli import UsageError, apply_threads, importable_from, thread_count

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CONFIG_FILE",
    "DASHBOARD_FILE",
    "LOG_DIR",
    "PROG",
    "SUMMARY_FILE",
    "USAGE",
    "RunArgs",
    "add_config_roots",
    "build_cli",
    "check_config",
    "condense_error",
    "config_root",
    "main",
    "new_run_dir",
    "parse_args",
    "run_experiment",
    "run_sweep",
    "summarize",
    "sweep_points",
    "write_stages_of",
]

CONFIG_FILE = "config.yaml"
DASHBOARD_FILE = "dashboard.html"
SUMMARY_FILE = "summary.csv"
LOG_DIR = "logs"
PROG = "devinterp run CONFIG.yaml"

USAGE = """\
usage: devinterp run CONFIG.yaml [--run-dir DIR] [--sweep KEY=V1,V2,...] [--threads N]
                                 [OVERRIDES ...]

Train the experiment of CONFIG.yaml (a LightningCLI config) with λ̂ tracking, then detect
stages and write the dashboard into the run directory (printed as the last line).

  --run-dir DIR            where the run goes (default: runs/<config name>-<timestamp>)
  --sweep KEY=V1,V2,...    run once per value, each in DIR/KEY=V; repeat for a grid;
                           KEY is a config key (model.init_args.lr) or `seed`
  --threads N              threads for torch, OpenMP and BLAS; overrides the config's
                           torch_threads (default: the config's torch_threads, else torch's
                           choice)
  OVERRIDES                LightningCLI overrides, e.g. --trainer.max_steps=100
                           --model.init_args.lr=0.1
Keys: devinterp run CONFIG.yaml --help (trainer), --model.help CLASS_PATH (a model's),
--print_config (the resolved config, without running).
"""


@dataclass
class RunArgs:
    """The command line of ``devinterp run``, split into its own flags and the overrides."""

    config: Path
    run_dir: Path | None = None
    sweeps: list[tuple[str, list[str]]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    threads: int | None = None


#: The flags of ``devinterp run`` itself (everything else goes to LightningCLI), with an example.
_OWN_FLAGS = {"--run-dir": "runs/my-run", "--sweep": "seed=0,1,2", "--threads": "1"}


def parse_args(argv: list[str]) -> RunArgs | None:
    """Split ``argv``; None when only help was asked for. Raises UsageError on bad flags."""
    if not argv or argv[0] in ("-h", "--help"):
        return None
    if argv[0].startswith("-"):
        raise UsageError(f"the config file must come first, got {argv[0]!r}; "
                         "usage: devinterp run CONFIG.yaml [overrides]")
    args = RunArgs(config=Path(argv[0]))
    rest = iter(argv[1:])
    for arg in rest:
        flag, eq, value = arg.partition("=")
        if flag not in _OWN_FLAGS:
            args.overrides.append(arg)
            continue
        if not eq:
            value = next(rest, "")
        if not value:
            raise UsageError(f"{flag} needs a value, e.g. {flag} {_OWN_FLAGS[flag]}")
        if flag == "--run-dir":
            args.run_dir = Path(value)
        elif flag == "--threads":
            try:
                args.threads = thread_count(value)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{e}, e.g. --threads 1") from e
        else:
            args.sweeps.append(_parse_sweep(value))
    keys = [k for k, _ in args.sweeps]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--sweep names a key twice ({', '.join(keys)}); give each key once")
    return args


def _parse_sweep(text: str) -> tuple[str, list[str]]:
    key, eq, values = text.partition("=")
    items = [v.strip() for v in values.split(",")]
    if not eq or not key.strip() or not all(items):
        raise UsageError(f"--sweep {text!r} is not KEY=V1,V2,...; e.g. --sweep seed=0,1,2 or "
                         "--sweep model.init_args.lr=0.1,0.01")
    key = key.strip().removeprefix("--")
    return ("seed_everything" if key == "seed" else key), items


# -- jsonargparse errors -> one line ---------------------------------------------------------------
_STRUCTURE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value"
    r"|Not a valid subclass|Subclass types expect|- a |Expected a <class 'NoneType'>)")


def condense_error(message: str, options: Sequence[str] = ()) -> str:
    """One line for a jsonargparse error: the full key that failed and what was wrong with it.

    jsonargparse nests its messages (``Parser key "model":`` > ``Problem with given class_path
    ...:`` > ``Parser key "lr":`` > the reason, plus alternatives tried for Union types); this
    walks that tree and keeps the path of keys and the innermost reason. ``options`` are the
    parser's option strings: an unknown option is named with the closest of them.
    """
    if message.startswith("Problems parsing config"):
        text = re.sub(r'\s*in "<unicode string>",', " at", " ".join(message.split()))
        return f"the config is not valid YAML ({text.split(':', 1)[1].strip()}); fix its syntax"
    given = re.findall(r"^\s*Given value: (.*)$", message, flags=re.M)
    subtypes = re.findall(r"^\s*Subtypes: \[(.*)\]$", message, flags=re.M)
    value = given[-1] if given else None
    if value and (m := re.match(r"^NestedArg\(key='[^']*', val=(.*)\)$", value)):
        value = m.group(1).strip("'\"")
    context = {"given": value,
               "subtypes": _type_name(subtypes[-1]) if subtypes else None,
               "options": list(options)}
    path: list[tuple[int, str]] = []
    class_path = None
    for raw in message.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip()
        path = [(i, k) for i, k in path if i < indent]
        if m := re.match(r'^(?:- )?Parser key "([^"]+)":?(.*)$', line):
            path.append((indent, m.group(1)))
            if m.group(2).strip():
                return _explain([k for _, k in path], m.group(2).strip(), class_path, context)
        elif m := re.match(r"^(?:- )?Problem with given class_path '([^']+)':(.*)$", line):
            class_path = m.group(1)
            path.append((indent, "init_args"))
            if m.group(2).strip():
                return _explain([k for _, k in path], m.group(2).strip(), class_path, context)
        elif not _STRUCTURE.match(line):
            return _explain([k for _, k in path], line.removeprefix("- "), class_path, context)
    return " ".join(message.split())


def _type_name(text: str) -> str:
    """``<class 'float'>`` -> ``float``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", text)
    return text.replace("typing.", "").replace(", NoneType", " or null")


def _explain(keys: list[str], reason: str, class_path: str | None,
             context: dict[str, Any]) -> str:
    """Phrase a failed key and its reason as 'problem; fix'."""
    dotted = ".".join(keys)
    if m := re.match(r"^Option '([^']+)' is not accepted", reason):
        key = f"{dotted}.{m.group(1)}" if dotted else m.group(1)
        known = _accepted(class_path) if dotted else []
        close = difflib.get_close_matches(m.group(1).split(".")[-1], known, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + (
            f"{class_path} accepts: {', '.join(known)}" if known else
            "check the spelling against `devinterp run CONFIG.yaml --print_config`")
        return f"unknown config key {key!r}; {hint}"
    if m := re.match(r"^unrecognized arguments: (.*)$", reason):
        unknown = [a.partition("=")[0] for a in m.group(1).split() if a.startswith("--")]
        close = [c for flag in unknown
                 for c in difflib.get_close_matches(flag, context["options"], n=1, cutoff=0.8)]
        hint = (f"did you mean {', '.join(close)}? " if len(close) == len(unknown) and close
                else "")
        return (f"unknown option(s) {m.group(1)}; {hint}check the spelling against "
                "`devinterp run CONFIG.yaml --help` (overrides look like --trainer.max_steps=100; "
                "options are never abbreviated)")
    if m := re.match(r"^Expected an? (.+?)\. Got value: (.*)$", reason):
        return (f"config key {dotted!r} must be {_type_name(m.group(1))}, got {m.group(2)!r}; "
                "fix its value")
    if re.match(r"^Expected an? ", reason) and context["subtypes"]:
        wanted = context["subtypes"]
        if "one of" not in wanted:
            wanted = wanted.replace(", ", " or ")
        return f"config key {dotted!r} must be {wanted}, got {context['given']!r}; fix its value"
    if m := re.match(r"^the following arguments are required: (.*)$", reason):
        return (f"the config sets no {m.group(1)}; add e.g. `model: {{class_path: "
                "experiments.tms.ToyModelOfSuperposition}` (see configs/)")
    if m := re.match(r"^File does not exist: (.*)$", reason):
        return f"file {m.group(1)} does not exist; give the path of an existing YAML config"
    where = f"config key {dotted!r}: " if dotted else ""
    if class_path and re.search(r"has no attribute|No module named|Import path", reason):
        return (f"{where}cannot import class_path {class_path!r} ({reason}); check the "
                "spelling (see configs/ for working examples)")
    return f"{where}{_type_name(reason)}"


def _accepted(class_path: str | None) -> list[str]:
    """The init argument names of ``class_path``, for suggestions (empty when not importable)."""
    if not class_path:
        return []
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# -- one run ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings that say nothing to a user of ``devinterp run``."""
    with warnings.catch_warnings():
        # Lightning's own use of a deprecated torch API: nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
        # devinterp run passes args and sys.argv holds the same command: not a mistake.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
        # The experiments' data are tensors in memory: worker processes would only add cost.
        warnings.filterwarnings("ignore", message=".*does not have many workers")
        yield


def check_config(config: Path) -> None:
    """The cheap checks of a config file, made before torch and Lightning are imported: it
    exists and is a YAML mapping. Everything else is LightningCLI's to check."""
    import yaml

    if not config.is_file():
        raise FileNotFoundError(f"config file {str(config)!r} not found; give the path of a YAML "
                                "config, e.g. configs/quickstart.yaml")
    try:
        doc = yaml.safe_load(config.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"the config {str(config)!r} is not valid YAML ({problem}{where}); fix "
                         "its syntax") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"the config {str(config)!r} is not a text file ({e}); give a YAML "
                         "config") from e
    if not isinstance(doc, dict):
        raise UsageError(f"the config {str(config)!r} is not a mapping of keys (model:, trainer:, "
                         "...); see configs/ for working examples")


def build_cli(config: Path, overrides: list[str], run_dir: Path | None) -> Any:
    """The experiment's LightningCLI, parsed (and with a ``run_dir``, built): torch and
    Lightning are imported here, after the cheap checks."""
    from devinterp.cli._lightning import build_cli as build

    check_config(config)
    add_config_roots(config)
    return build(config, overrides, run_dir)


def config_root(config: Path) -> Path:
    """Where a config's ``class_path`` modules live: the folder holding the config, or for a
    config in a ``configs/`` folder the folder above it (the repository root, which holds
    ``experiments/``)."""
    folder = config.resolve().parent
    return folder.parent if folder.name == "configs" else folder


def add_config_roots(config: Path) -> None:
    """Make the config's own code importable: append :func:`config_root` to ``sys.path``.

    The repository's ``experiments`` package (``class_path: experiments.tms....``) is not
    installed with devinterp; ``devinterp run configs/tms.yaml`` finds it next to ``configs/``
    from any current directory. The path is appended, so an installed package of the same name
    wins. A config is the user's own file, like a script they run, so its folder is trusted as
    a script's is.
    """
    importable_from(config_root(config))


def new_run_dir(config: Path, run_dir: Path | None) -> Path:
    """The run directory to create: ``run_dir`` if empty or new, else a fresh timestamped one."""
    if run_dir is not None:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(f"run directory {str(run_dir)!r} exists and is not empty; choose a "
                             "new --run-dir or remove it")
        return run_dir
    base = Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_experiment(config: Path, overrides: list[str], run_dir: Path) -> Path:
    """Train, track λ̂, detect stages and write the dashboard, all into ``run_dir``."""
    with _quiet():
        cli = build_cli(config, overrides, run_dir)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    write_stages_of(run_dir)
    (run_dir / DASHBOARD_FILE).write_text(_dashboard([run_dir]))
    return run_dir


def write_stages_of(run_dir: Path) -> list[dict]:
    """The run's stages, detected once per run: the ``LLCCallback`` already detected them and
    wrote ``stages.json`` at the end of inline training, so those are read back; otherwise
    (deferred mode, too few λ̂ points for the callback) they are detected and written here, and
    with too few λ̂ points ``stages.json`` says why there are none."""
    from devinterp import stages as st

    found = st.read_stages(run_dir)  # the run directory was new: only this run wrote it
    if found is None:
        found = _detect_into(run_dir)
    if found:
        print(st.format_table(found), file=sys.stderr)
    return found


def _detect_into(run_dir: Path) -> list[dict]:
    """Detect the run's stages with the default method and write ``stages.json``; notes (NaN
    rows skipped, too few λ̂ points) go to stderr."""
    from devinterp import stages as st

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found = st.detect_stages(run_dir, method="auto")
        except ValueError as e:
            print(f"devinterp run: note: no stages detected: {e}", file=sys.stderr)
            st.write_stages(run_dir, [], method=st.DEFAULT_METHOD, params={}, skipped=str(e))
            return []
    for w in caught:
        print(f"devinterp run: note: {w.message}", file=sys.stderr)
    st.write_stages(run_dir, found, method=st.DEFAULT_METHOD,
                    params=st.make_detector(st.DEFAULT_METHOD).params)
    return found


def _dashboard(run_dirs: list[Path]) -> str:
    from devinterp.dashboard import build_html

    return build_html(run_dirs)


# -- sweeps ----------------------------------------------------------------------------------------
def sweep_points(sweeps: list[tuple[str, list[str]]]) -> list[tuple[str, dict[str, str]]]:
    """(directory name, {key: value}) for every combination of the swept values."""
    keys = [key for key, _ in sweeps]
    shorts = [key.split(".")[-1].replace("seed_everything", "seed") for key in keys]
    if len(set(shorts)) != len(shorts):
        shorts = keys
    points = []
    for values in itertools.product(*(vals for _, vals in sweeps)):
        name = ",".join(f"{s}={v}" for s, v in zip(shorts, values, strict=True))
        points.append((re.sub(r"[^\w.=,+-]", "_", name), dict(zip(keys, values, strict=True))))
    return points


def _overrides(values: dict[str, str]) -> list[str]:
    return [f"--{key}={value}" for key, value in values.items()]


def summarize(run_dir: Path) -> dict[str, Any]:
    """Final training loss (and validation loss), final λ̂ and number of stages of a run."""
    from devinterp.run.store import load_run

    run = load_run(run_dir)
    row: dict[str, Any] = {}
    for column, name in (("train_loss", "final_loss"), ("val_loss", "final_val_loss")):
        if column in run.metrics.columns:
            row[name] = _last(run.metrics[column])
    row["final_llc"] = _last(run.llc["llc_mean"])
    row["final_llc_std"] = _last(run.llc["llc_std"]) if len(run.llc) else math.nan
    row["num_stages"] = len(run.stages)
    return row


def _last(values: pd.Series) -> float:
    import pandas as pd

    finite = pd.to_numeric(values, errors="coerce").dropna()
    return float(finite.iloc[-1]) if len(finite) else math.nan


def run_sweep(config: Path, overrides: list[str], sweeps: list[tuple[str, list[str]]],
              run_dir: Path) -> Path:
    """Run every combination in ``run_dir/<name>``; write ``summary.csv`` and the comparison."""
    import pandas as pd

    from devinterp.run.store import RunStore

    points = sweep_points(sweeps)
    with _quiet():
        for name, values in points:  # fail on a bad value before anything trains
            try:
                build_cli(config, [*overrides, *_overrides(values)], None)
            except UsageError as e:
                raise UsageError(f"sweep point {name}: {e}") from e
    RunStore(run_dir, create=True)
    rows = []
    for name, values in points:
        print(f"devinterp run: sweep point {name}", file=sys.stderr)
        run_experiment(config, [*overrides, *_overrides(values)], run_dir / name)
        rows.append({"run": name, **values, **summarize(run_dir / name)})
    pd.DataFrame(rows).to_csv(run_dir / SUMMARY_FILE, index=False)
    (run_dir / DASHBOARD_FILE).write_text(_dashboard([run_dir / name for name, _ in points]))
    print(pd.DataFrame(rows).to_string(index=False), file=sys.stderr)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """``devinterp run CONFIG.yaml [--run-dir DIR] [--sweep KEY=V1,...] [overrides]``."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args is None:
        print(USAGE)
        return 0
    if args.threads is not None:  # the config's torch_threads gives way, and the saved config says so
        args.overrides.append(f"--torch_threads={args.threads}")
    try:
        if any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config=")
               or a.endswith(".help") for a in args.overrides):
            # LightningCLI prints the keys (of a class: --model.help CLASS) or the config
            with _quiet():
                build_cli(args.config, args.overrides, None)
            return 0
        # Every check that needs no torch comes first: a typo costs no heavy imports.
        check_config(args.config)
        run_dir = new_run_dir(args.config, args.run_dir)
        apply_threads(args.threads)  # before torch is imported, so it starts with that many
        if args.sweeps:
            run_sweep(args.config, args.overrides, args.sweeps, run_dir)
        else:
            run_experiment(args.config, args.overrides, run_dir)
    except SystemExit as e:  # --help / --print_config
        return int(e.code or 0)
    sys.stdout.flush()
    print(run_dir, flush=True)
    return 0
