"""The ``mpbackprop`` command line.

``mpbackprop compile MODEL.py`` turns a model file (see :mod:`mpbackprop.compiler.modelfile`) into a
saved graph; ``mpbackprop inspect FILE`` describes one. Global options come before the
subcommand (``mpbackprop --seed 3 compile ...``); every option can also be set through an
environment variable ``MPBACKPROP_<OPTION>`` (``MPBACKPROP_SEED=3``,
``MPBACKPROP_COMPILE_FORMAT=json``).

Exit statuses: 0 success; 1 ``verify`` found the engine disagreeing with the reference;
2 bad input — a library error (:class:`~mpbackprop.errors.MPBackpropError`), an OS error on a
file (a full disk included), or a refused command line, each printed as one line ``Error: ...``
on stderr; 70 (``EX_SOFTWARE``) an unexpected exception, i.e. a bug, also one line; 130
interrupted (Ctrl-C). ``--debug`` prints the traceback instead of the line. New subcommands get
this by decorating their callback with :func:`report_errors` (below ``@main.command()``) and
raising :class:`CLIError` (or a library error) for refusals of their own. Callbacks return None:
like click's own non-standalone ``main``, the group turns an ``int`` return value into the exit
status. Option values are checked by the types below (:data:`SEED`, :data:`META_SEED` and
:data:`THREADS`, bounded by :mod:`mpbackprop.limits`; :class:`PositiveFloat`, :class:`PlotFile`):
a refusal names the option and what it allows.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from .. import __version__
from .._io import atomic_write, is_disk_full
from .._json import dumps
from ..errors import ModelFileError, MPBackpropError, ShapeError, UnsupportedOpError, first_line
from ..evaluation.run import SUITE_CHOICES
from ..graph.exports import FORMATS
from ..limits import MAX_META_SEED, MAX_SEED, MAX_THREADS
from ..engine.losses import LOSSES
from ..metatrain.config import CHOICES, MetaConfig
from ..device import DEVICES
from .tables import shape_text
from ..tasks.registry import FAMILIES
from ..evaluation.verify import DTYPES, RULES

__all__ = ["main", "CLIError", "CLIState", "report_errors", "ShapeParam", "FORMATS", "IntBetween", "SEED", "META_SEED",
           "THREADS", "PositiveFloat", "PlotFile", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED"]

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {
    "auto_envvar_prefix": "MPBACKPROP",
    "show_default": True,
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


# ---------------------------------------------------------------------------- errors
#: Exit status of ``verify`` when the engine disagrees with the reference.
EXIT_FAILED = 1
#: Exit status of every refusal of bad input (one ``Error: ...`` line).
EXIT_BAD_INPUT = 2
#: Exit status of an unexpected exception, a bug (sysexits' ``EX_SOFTWARE``).
EXIT_INTERNAL = 70
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class CLIError(click.ClickException):
    """A refusal of the command line: printed as one ``Error: ...`` line, exit status 2."""

    exit_code = EXIT_BAD_INPUT


@dataclass
class CLIState:
    """Global options, stored as ``ctx.obj`` by the group callback."""

    seed: int = 0
    debug: bool = False


def _debug_requested() -> bool:
    ctx = click.get_current_context(silent=True)
    state = ctx.find_object(CLIState) if ctx is not None else None
    return bool(state and state.debug)


def _exit(code: int) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.exit(code)
    sys.exit(code)


def report_errors(func: F) -> F:
    """Decorate a subcommand callback so that failures end it with one line (or a traceback).

    ``MPBackpropError`` and ``OSError``: ``Error: <message>`` on stderr, exit 2 (a full disk:
    ``no space left on device writing <file>``). Click's own exceptions (``CLIError``,
    ``click.BadParameter``, ...) pass through to :class:`_Group`, which prints them on one line
    too. Any other exception: one line ``Error: internal error ...`` and exit 70. With
    ``--debug`` each of these prints the full traceback instead of the line.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.exceptions.ClickException:
            if _debug_requested():
                traceback.print_exc(file=sys.stderr)
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (KeyboardInterrupt, BrokenPipeError):  # click's main handles both
            raise
        except MPBackpropError as exc:
            _fail(exc, first_line(exc), EXIT_BAD_INPUT)
        except OSError as exc:
            _fail(exc, _os_error_line(exc), EXIT_BAD_INPUT)
        except Exception as exc:  # noqa: BLE001 - a bug: still one line unless --debug
            _fail(exc, _internal_error_line(exc), EXIT_INTERNAL)
        return None  # pragma: no cover - _fail always exits

    return wrapper  # type: ignore[return-value]


def _os_error_line(exc: OSError) -> str:
    """``<file>: <reason>``; a full disk (or quota) names the file being written (see
    :func:`_file_being_written`)."""
    if is_disk_full(exc):
        target = exc.filename or _file_being_written(exc)
        where = f" writing {target}" if target else ""
        return f"no space left on device{where}; free some space and rerun"
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or first_line(exc)}"


def _file_being_written(exc: BaseException) -> Path | None:
    """The target of the :func:`~mpbackprop._io.atomic_write` during which ``exc`` was raised.

    A failing ``write()`` raises an ``OSError`` without a file name; every file mpbackprop
    writes goes through ``atomic_write``, whose frame in the traceback still holds the target.
    """
    target = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is atomic_write.__code__:
            target = tb.tb_frame.f_locals.get("path")
        tb = tb.tb_next
    return target


def _internal_error_line(exc: BaseException) -> str:
    return f"internal error ({first_line(exc, typed=True)}); rerun with --debug for the traceback"


def _fail(exc: BaseException, message: str, code: int) -> None:
    if _debug_requested():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    else:
        click.echo(f"Error: {message}", err=True)
    _exit(code)


class _Group(click.Group):
    """A group whose usage errors print one line (``Error: ... (see 'CMD --help')``), exit 2.

    Click's default prints the usage synopsis, a hint and the message on four lines. Ctrl-C
    exits 130; an exception that escapes the callbacks' :func:`report_errors` (the group's own
    callback has none) is still an internal error: one line, exit 70.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `mpbackprop`: the help text
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {first_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {first_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - a bug outside report_errors
            if _debug_in(args):
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            else:
                click.echo(f"Error: {_internal_error_line(exc)}", err=True)
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else 0)


def _debug_in(args: Any) -> bool:
    """Whether ``--debug`` (or ``MPBACKPROP_DEBUG``) was given, read without a click context."""
    argv = sys.argv[1:] if args is None else list(args)
    env = os.environ.get("MPBACKPROP_DEBUG", "").strip().lower()
    return "--debug" in argv or env in ("1", "true", "t", "yes", "y", "on")


def _refuse(kind: click.ParamType, message: str, param: click.Parameter | None, ctx: click.Context | None) -> None:
    """``kind.fail(message)``, naming the environment variable when the value came from one."""
    if param is not None and ctx is not None and param.name is not None \
            and ctx.get_parameter_source(param.name) is click.core.ParameterSource.ENVIRONMENT:
        envvar = param.envvar if isinstance(param.envvar, str) else \
            f"{ctx.auto_envvar_prefix}_{param.name.upper()}" if ctx.auto_envvar_prefix else None
        if envvar:
            message += f" (from {envvar})"
    kind.fail(message, param, ctx)


class IntBetween(click.ParamType):
    """An integer ``lo <= N <= hi``; a refusal says which values are allowed (``allowed``)."""

    name = "integer"

    def __init__(self, lo: int, hi: int, allowed: str) -> None:
        self.lo, self.hi, self.allowed = lo, hi, allowed

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                _refuse(self, f"{value!r} is not an integer; allowed: {self.allowed}", param, ctx)
        if not self.lo <= number <= self.hi:
            _refuse(self, f"{value} is out of range; allowed: {self.allowed}", param, ctx)
        return number


#: The global ``--seed`` (also ``MPBACKPROP_SEED``): what ``torch.manual_seed`` and the seeded
#: task and feedback streams accept, with room for the offsets added to it.
SEED = IntBetween(0, MAX_SEED, "0 <= seed < 2**63")
#: ``meta-train --seed`` (and the global ``--seed`` when meta-train takes it): ``MetaConfig``'s bound.
META_SEED = IntBetween(0, MAX_META_SEED, "0 <= seed < 2**32")
#: ``--threads`` of the commands that set torch's intra-op threads (more only stalls).
THREADS = IntBetween(1, MAX_THREADS, f"1 <= threads <= {MAX_THREADS}")


class PositiveFloat(click.ParamType):
    """A finite number ``> 0`` (a learning rate, a scale): ``nan``, ``inf`` and ``<= 0`` are refused."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            _refuse(self, f"{value!r} is not a number; allowed: a finite number > 0", param, ctx)
        if not math.isfinite(number) or number <= 0:
            _refuse(self, f"{value} is not allowed; give a finite number > 0", param, ctx)
        return number


class PlotFile(click.Path):
    """A picture to write: the suffix picks the format, one of :data:`PLOT_SUFFIXES`."""

    #: Picture formats the plots can be written in (matplotlib backends present everywhere).
    PLOT_SUFFIXES = (".png", ".pdf", ".svg")

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(super().convert(value, param, ctx))
        if path.suffix.lower() not in self.PLOT_SUFFIXES:
            kind = f"a {path.suffix} file" if path.suffix else "a file without a suffix"
            _refuse(self, f"{path}: cannot draw into {kind}; use a name ending in "
                          f"{', '.join(self.PLOT_SUFFIXES[:-1])} or {self.PLOT_SUFFIXES[-1]}", param, ctx)
        return path


class ShapeParam(click.ParamType):
    """A per-sample shape such as ``1,8,8`` (see :func:`mpbackprop.compiler.modelfile.parse_shape`)."""

    name = "SHAPE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        from ..compiler.modelfile import parse_shape

        try:
            return parse_shape(value)
        except ModelFileError as exc:
            self.fail(str(exc), param, ctx)


_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@contextlib.contextmanager
def _about(model_path: Path, shape: tuple[int, ...]) -> Any:
    """Prefix compiler errors with the model file and input shape they concern; while the model's
    code runs, what it prints goes to stderr (stdout may be JSON)."""
    from ..compiler.budget import GraphTooLargeError
    from ..compiler.modelfile import model_output_to_stderr

    try:
        with model_output_to_stderr():
            yield
    except (UnsupportedOpError, ShapeError, GraphTooLargeError) as exc:
        raise type(exc)(f"{model_path} (input shape {shape_text(shape)}): {exc}") from exc


# ----------------------------------------------------------------------------- group
@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", "-V", prog_name="mpbackprop")
@click.option("--seed", type=SEED, default=0, help=f"Seed for torch.manual_seed before anything runs ({SEED.allowed}).")
@click.option("--debug", is_flag=True, default=False, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, seed: int, debug: bool) -> None:
    """mpbackprop: learn the backward pass by message passing on DGL heterographs.

    Compile a PyTorch network into a neuron/param heterograph, inspect and verify it, meta-train
    a learned backward pass, evaluate it against tuned baselines and analyse what it learned.
    Exit status: 0 success, 1 verification failed, 2 bad input (one "Error: ..." line on stderr),
    70 internal error (a bug; also one line), 130 interrupted; --debug prints the traceback instead.
    Options may also come from environment variables: MPBACKPROP_SEED, MPBACKPROP_DEBUG,
    MPBACKPROP_<COMMAND>_<OPTION> (e.g. MPBACKPROP_COMPILE_FORMAT=json).
    """
    import torch

    ctx.obj = CLIState(seed=seed, debug=debug)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- compile



_FORMAT_HELP = """\
Compile MODEL (a .py file) into a neuron/param heterograph and save it.

MODEL defines `model` (a torch.nn.Module) or `build_model()` returning one, and INPUT_SHAPE,
the per-sample input shape without the batch axis (or pass --input-shape).

\b
Formats (default: from the --output extension, else dgl):
  dgl      the graph and its layer metadata in one DGL file (.bin).
  graphml  networkx.write_graphml of CompiledNetwork.to_networkx(): nodes n<i> (neuron) and
           p<i> (param) with their scalar features (neuron coord split into coord_c/_h/_w),
           edges with etype/eid (and coef on fixed edges); reverse edge types left out;
           graph attributes format, model, dtype, input_shape, output_layer, metadata (JSON).
  json     one strict JSON object (non-finite numbers as null):
             format: "mpbackprop-json", version: 1, model: the MODEL path, dtype: of the values,
             summary: CompiledNetwork.summary() (num_nodes, num_edges, layers, ...),
             network: CompiledNetwork.metadata() (input_shape, output_layer, full layer records),
             nodes: {"neuron"|"param": {"count": N, "data": {feature: [per-node values]}}},
             edges: {"src:etype:dst": {"src": [ids], "dst": [ids], "data": {"coef": [...]}}}
                    for every canonical edge type, edge k at position k.
All three read back with mpbackprop.load(path) and `mpbackprop inspect`.

Parameters with requires_grad=False are compiled as frozen (param feature `frozen`; training
leaves them unchanged). Compiling refuses operations whose gradient the graph would not
reproduce (in-place changes of tensors read again, no_grad blocks, detach, custom autograd
Functions), networks whose output per sample is not a vector, graphs estimated to need more
than MPBACKPROP_MAX_GRAPH_GB gigabytes (default 2), and any network whose compiled forward
pass differs from the module's on a random input.
"""


@main.command("compile", help=_FORMAT_HELP, short_help="Compile MODEL.py into a graph file.")
@click.argument("model_path", metavar="MODEL", type=_EXISTING_FILE)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: ./<MODEL stem><format extension>].")
@click.option("--input-shape", type=ShapeParam(), default=None,
              help="Per-sample input shape such as 1,8,8; overrides the file's INPUT_SHAPE.")
@click.option("--attr", default=None, metavar="NAME",
              help="Take the network from NAME (a module or a zero-argument builder) instead of "
                   "model/build_model.")
@click.option("--format", "format_", envvar="MPBACKPROP_COMPILE_FORMAT", type=click.Choice(list(FORMATS)), default=None,
              help="Output format (see above).")
@report_errors
def compile_cmd(model_path: Path, output: Path | None, input_shape: tuple[int, ...] | None, attr: str | None,
                format_: str | None) -> None:
    import mpbackprop
    from ..graph.exports import output_format, write
    from ..compiler.modelfile import load_model
    from .tables import compile_lines

    out, fmt = output_format(output, format_, model_path)
    model, shape = load_model(model_path, attr=attr, input_shape=input_shape)
    start = time.perf_counter()
    with _about(model_path, shape):
        net = mpbackprop.compile(model, shape)
    elapsed = time.perf_counter() - start
    write(net, out, fmt, str(model_path))
    for line in compile_lines(net, model_path, model, out, fmt, elapsed):
        click.echo(line)


# --------------------------------------------------------------------------- inspect
@main.command("inspect", short_help="Describe a compiled graph file.")
@click.argument("file", type=_EXISTING_FILE)
@click.option("--json", "as_json", envvar="MPBACKPROP_INSPECT_JSON", is_flag=True, default=False,
              help="Print CompiledNetwork.summary() as strict JSON (num_nodes, num_edges, frozen_params, "
                   "layers, ...).")
@click.option("--plot", type=PlotFile(), default=None, metavar="FILE.png|.pdf|.svg",
              help="Also draw the network (neurons in columns by layer, weights as coloured edges).")
@click.option("--max-nodes", type=click.IntRange(min=1), default=400,
              help="Refuse to --plot networks with more neurons than this.")
@report_errors
def inspect_cmd(file: Path, as_json: bool, plot: Path | None, max_nodes: int) -> None:
    """Describe a compiled graph FILE written by `mpbackprop compile` (--format dgl, json or graphml;
    the format is read from the file's content).

    Prints node counts per type, edge counts per canonical edge type and the layer table (with
    the number of frozen parameters per layer when there are any).
    """
    from ..graph.exports import load_any
    from .tables import inspect_lines

    net = load_any(file)
    if plot is not None:
        from ..graph.plotting import check_plot_size

        check_plot_size(net, max_nodes)
    summary = net.summary()
    if as_json:
        click.echo(dumps(summary, indent=2))
    else:
        for line in inspect_lines(summary, str(file)):
            click.echo(line)
    if plot is not None:
        from ..graph.plotting import plot_network

        plot_network(net, plot, max_nodes=max_nodes, title=file.stem)
        # with --json, stdout stays pure JSON
        click.echo(f"wrote: {plot}", err=as_json)



# ---------------------------------------------------------------------------- verify
@main.command("verify", short_help="Check the engine against autograd on MODEL.py.")
@click.argument("model_path", metavar="MODEL", type=_EXISTING_FILE)
@click.option("--input-shape", type=ShapeParam(), default=None, help="Per-sample input shape (overrides INPUT_SHAPE).")
@click.option("--attr", default=None, metavar="NAME", help="Take the network from NAME instead of model/build_model.")
@click.option("--batch", type=click.IntRange(min=1), default=8, help="Random batch size.")
@click.option("--rule", type=click.Choice(RULES), default="exact",
              help="exact: compare with autograd; fa: with autograd through fixed feedback weights.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float64",
              help="float64: max abs error <= 1e-10; float32: max relative error <= 1e-4.")
@click.option("--loss", type=click.Choice(["auto", *LOSSES]), default="auto",
              help="auto: cross-entropy for several outputs, MSE for one.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help='Print strict JSON {"ok", "max_abs_err", "max_rel_err", "frozen_params", "layers": [...], ...} '
                   "(what the model file prints goes to stderr).")
@click.pass_context
@report_errors
def verify_cmd(ctx: click.Context, model_path: Path, input_shape: tuple[int, ...] | None, attr: str | None,
               batch: int, rule: str, dtype: str, loss: str, as_json: bool) -> None:
    """Compile MODEL, run the engine's backward pass and the reference on one random batch,
    and compare the per-parameter signals layer by layer.

    Frozen parameters (requires_grad=False) are compared too and counted per layer.
    Exit status 0 when every layer is within tolerance, 1 when not, 2 on bad input.
    """
    import torch

    from ..compiler.modelfile import load_model
    from ..evaluation.verify import verify

    model, shape = load_model(model_path, attr=attr, input_shape=input_shape)
    seed = ctx.find_object(CLIState).seed if ctx.find_object(CLIState) else 0
    with _about(model_path, shape):
        report = verify(model, shape, batch=batch, rule=rule, dtype=getattr(torch, dtype), seed=seed,
                        loss=None if loss == "auto" else loss)
    if as_json:
        click.echo(dumps(report.to_json(), indent=2))
    else:
        from .tables import verify_lines

        for line in verify_lines(report, model_path, rule, dtype, batch):
            click.echo(line)
    if not report.ok:
        _exit(EXIT_FAILED)


# ------------------------------------------------------------------------ meta-train
def _range_param(ctx: click.Context | None, param: click.Parameter | None, text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected T or LO,HI (integers)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] < 1 or values[0] > values[1]:
        raise click.BadParameter(f"{text!r}: expected T or LO,HI with 1 <= LO <= HI")
    return values[0], values[1]


#: The default recipe: what ``meta-train`` runs without options. Its help is made from it, so the
#: defaults it shows are the ones that run.
_RECIPE = MetaConfig()


def _recipe(name: str) -> str:
    """A field of the default recipe as a flag writes it (``100,2500`` for a range)."""
    value = getattr(_RECIPE, name)
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _default(name: str) -> str:
    return f"[default: {_recipe(name)}]"


def _times(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values[:-1]) + f" and {values[-1]}" if len(values) > 1 else str(values[0])


_META_TRAIN_HELP = f"""\
Meta-train the learned backward + update rule (method.md §4).

With no options: the default recipe (MetaConfig): family {_RECIPE.family}, estimator {_RECIPE.estimator},
{_RECIPE.outer_steps} outer steps of {_RECIPE.tasks_per_step} tasks, each task's horizon T drawn
log-uniformly from {_RECIPE.unroll[0]} to {_RECIPE.unroll[1]} inner steps and run {_RECIPE.truncation} steps
per outer step, the {_RECIPE.update_rule} update (peak rate {_RECIPE.update_lr}, learned weight decay
{'from ' + str(_RECIPE.weight_decay_init) if _RECIPE.weight_decay else 'off'}). The options' defaults are the recipe's; with --resume, the
run's own. Writes config.json, rule.pt (latest), best.pt (best on the meta-validation tasks: the mean over
{_times(_RECIPE.eval_multiples)} x {_RECIPE.eval_horizon} steps of the mean log validation loss, each run
told its length), state.pt, metrics.jsonl and meta_loss.png to the run directory, which one run at a time
may use (.lock). An --out that already holds a run needs --resume or --overwrite. Ctrl-C or SIGTERM
finishes the current outer step, saves it and exits 130 (a second one, a second later or more, exits at
once, keeping the last checkpoint); --resume then continues exactly.

Seed: --seed here, else the global `mpbackprop --seed`, else the --config file's, else {_RECIPE.seed}.
"""


def _global_seed_for_meta_train(parent: click.Context) -> int:
    """The global ``--seed``, which meta-train takes when it has no ``--seed`` of its own: refused
    when it is beyond :data:`META_SEED`'s bound (the global one allows more)."""
    seed = int(parent.params["seed"])
    if seed > META_SEED.hi:
        source = " (from MPBACKPROP_SEED)" if parent.get_parameter_source("seed") \
            is click.core.ParameterSource.ENVIRONMENT else ""
        raise CLIError(f"the global --seed {seed}{source} is out of range for meta-train; allowed: "
                       f"{META_SEED.allowed} (meta-train's own --seed wins over it)")
    return seed


@main.command("meta-train", help=_META_TRAIN_HELP, short_help="Meta-train a learned rule on a task family.")
@click.option("--config", "config_path", type=_EXISTING_FILE, default=None,
              help="JSON file of MetaConfig fields; flags given on the command line win.")
@click.option("--family", default=None, help=f"Task family: {', '.join(FAMILIES)} {_default('family')}.")
@click.option("--task", "task_file", type=click.Path(path_type=Path), default=None, metavar="FILE.py",
              help="A task file (your datasets and models, see mpbackprop.tasks.taskfile): its family is the run's; "
                   "the run records its path and fingerprint.")
@click.option("--estimator", type=click.Choice(CHOICES["estimator"]), default=None,
              help=f"Meta-gradient estimator {_default('estimator')}.")
@click.option("--outer-steps", type=click.IntRange(min=0), default=None, help=f"Outer steps {_default('outer_steps')}.")
@click.option("--unroll", default=None, metavar="T|LO,HI", callback=_range_param,
              help=f"Inner horizon, or a range sampled log-uniformly {_default('unroll')}.")
@click.option("--truncation", type=click.IntRange(min=1), default=None,
              help=f"Inner steps per truncation K (at most the longest unroll) {_default('truncation')}.")
@click.option("--tasks-per-step", type=click.IntRange(min=1), default=None,
              help=f"Tasks averaged per outer step {_default('tasks_per_step')}.")
@click.option("--objective", type=click.Choice(CHOICES["objective"]), default=None,
              help=f"Weights of the validation loss over the unroll {_default('objective')}.")
@click.option("--backward-init", type=click.Choice(CHOICES["backward_init"]), default=None,
              help=f"Start the learned backward at exact backprop or at feedback alignment {_default('backward_init')}.")
@click.option("--update-init", type=click.Choice(CHOICES["update_init"]), default=None,
              help=f"Start the learned update at Adam or from scratch {_default('update_init')}.")
@click.option("--meta-lr", type=PositiveFloat(), default=None,
              help=f"Outer Adam learning rate, a finite number > 0 {_default('meta_lr')}.")
@click.option("--seed", type=META_SEED, default=None,
              help=f"Seed of the run, {META_SEED.allowed} [default: the global --seed if given, else the config's, "
                   f"else {_RECIPE.seed}].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory [default: runs/<family>-<estimator>-s<seed>].")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the run in --out where it stopped, with its own settings (only --outer-steps, "
                   "--threads, --progress and --tensorboard may differ).")
@click.option("--overwrite", is_flag=True, default=False,
              help="Start anew in an --out that holds a run (removes its checkpoints and metrics).")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help=f"Where the run computes {_default('device')}; only cpu so far (cuda is refused).")
@click.option("--threads", type=THREADS, default=1,
              help=f"torch threads, {THREADS.allowed} (tiny target networks run fastest on one).")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--tensorboard", "tb_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the metrics as TensorBoard scalars here (needs mpbackprop[tensorboard]).")
@click.pass_context
@report_errors
def meta_train_cmd(ctx: click.Context, config_path: Path | None, out: Path | None, resume: bool, overwrite: bool,
                   threads: int, progress: bool, tb_dir: Path | None, **flags: Any) -> None:
    import torch

    from ..metatrain import MetaTrainer
    from ..metatrain.config import asked_settings, default_run_dir
    from ..metatrain.distributed import from_environment

    torch.set_num_threads(threads)
    parent = ctx.parent
    if (flags["seed"] is None and parent is not None
            and parent.get_parameter_source("seed") not in (None, click.core.ParameterSource.DEFAULT)):
        flags["seed"] = _global_seed_for_meta_train(parent)
    flags = {k: (str(v) if k == "task_file" else v) for k, v in flags.items() if v is not None}
    try:  # the settings asked for: the config file's, then the flags given
        asked, cfg = asked_settings(config_path, flags, resume)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = default_run_dir(cfg, asked, flags) if out is None else out
    workers = from_environment()  # torchrun sets WORLD_SIZE/RANK; a plain run is one worker
    try:
        trainer = MetaTrainer({**asked, **flags} if cfg is None else cfg, out, resume=resume, workers=workers,
                              overwrite=overwrite)
        cfg = trainer.cfg
        if workers.is_writer:
            click.echo(f"meta-training {cfg.family} with {cfg.estimator}: {cfg.outer_steps} outer steps, "
                       f"{cfg.tasks_per_step} tasks x {cfg.truncation} inner steps per worker, "
                       f"{workers.world_size} worker(s), unroll {cfg.unroll[0]}-{cfg.unroll[1]}, seed {cfg.seed}"
                       + (f" (resuming at step {trainer.step})" if resume else ""), err=True)
        tb = None
        if tb_dir is not None and workers.is_writer:
            from ..evaluation.tensorboard import TensorBoard

            tb = TensorBoard(tb_dir)
        summary = trainer.run(progress=progress and workers.is_writer, on_step=tb.meta_step if tb else None)
        if tb:
            tb.close()
    finally:
        workers.close()
    if workers.is_writer:
        click.echo(f"results in {out}/: rule.pt (latest), best.pt (best meta-validation score "
                   f"{summary.best_score:.4f}), metrics.jsonl, meta_loss.png, config.json")
        click.echo(f"outer steps: {summary.steps}, skipped (non-finite): {summary.skipped}, "
                   f"time: {summary.seconds:.0f} s")
        resume_hint = f"continue with: mpbackprop meta-train --out {out} --resume"
        if summary.stopped_at_once:
            last = f"step {summary.saved_step}" if summary.saved_step is not None else "none"
            click.echo(f"stopped at once by a second signal: nothing saved since the last checkpoint ({last}); "
                       f"{resume_hint}", err=True)
        elif summary.interrupted:
            click.echo(f"interrupted ({summary.signal}): finished and saved step {summary.steps}; {resume_hint}",
                       err=True)
    if summary.interrupted:
        _exit(EXIT_INTERRUPTED)



_DEVICE_HELP = ("Where the runs compute: the dense paths run on cuda; a rule or network that needs the DGL "
                "reference path (CPU only) is refused there.")


# -------------------------------------------------------------------------- evaluate
@main.command("evaluate", short_help="Compare a learned rule with tuned baselines.")
@click.argument("rule", default="default")
@click.option("--family", default=None,
              help="Task family whose held-out tasks the suites are built from [default: the task file's, else "
                   "the run's if it used a task file, else digits-mlp].")
@click.option("--task", "task_file", type=click.Path(path_type=Path), default=None, metavar="FILE.py",
              help="A task file: evaluate on its held-out tasks (suites heldout and horizon).")
@click.option("--suite", type=click.Choice(SUITE_CHOICES),
              default="heldout", help="Which transfer suite ('all': every suite but 'long'; 'long': 10T and 25T "
                                      "on every family, 4x wider and 2x deeper nets).")
@click.option("--steps", type=click.IntRange(min=1), default=100, help="Horizon T.")
@click.option("--seeds", type=click.IntRange(min=2), default=10, help="Reported seeds per task and method.")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=3, help="Held-out tasks per suite.")
@click.option("--tuning-seeds", type=click.IntRange(min=1), default=2, help="Seeds used to tune learning rates.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print the report as JSON (strict: a value that is not finite, e.g. the mean loss of a "
                   "method with diverged runs, is null; 'diverged' counts those runs).")
@click.option("--plot", type=PlotFile(), default=None, metavar="FILE.png|.pdf|.svg",
              help="Learning curves with 95% bands per method.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write results.json, report.txt, curves.png and the tuning cache here.")
@click.option("--threads", type=THREADS, default=1, help="torch threads (1..256).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--tensorboard", "tb_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the learning curves as TensorBoard scalars here (needs mpbackprop[tensorboard]).")
@report_errors
def evaluate_cmd(rule: str, family: str | None, task_file: Path | None, suite: str, steps: int, seeds: int,
                 n_tasks: int, tuning_seeds: int, as_json: bool, plot: Path | None, out: Path | None, threads: int,
                 device: str, progress: bool, tb_dir: Path | None) -> None:
    """Evaluate RULE (a meta-training directory, a rule .pt file, or 'default') against SGD,
    SGD+momentum and Adam with learning rates tuned per task on separate seeds, plus the
    ablations learned-update-on-exact-backprop, learned-backward+Adam and FA+Adam.
    """
    import torch

    from ..evaluation import run as er
    from ..evaluation.protocol import resolve_rule
    from ..device import resolve as resolve_device

    torch.set_num_threads(threads)
    resolve_device(device)  # an unavailable device: one line before anything runs
    try:
        family = er.task_family(family, task_file, rule)
        er.check_suite(family, suite)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    backward, update, path = resolve_rule(rule)
    run = er.run_suites((backward, update), path, family, suite, steps, seeds, n_tasks, tuning_seeds, out, progress,
                        device)
    if plot or out:
        er.write_plots(run, plot, out)
    if tb_dir is not None:
        er.write_tensorboard(run, tb_dir)
    if as_json:
        click.echo(dumps(run.document(), indent=2))
    else:
        for line in er.report_lines(run, titles=True):
            click.echo(line)
    if out:
        click.echo(f"results in {out}/", err=True)
    if run.interrupted:
        click.echo("interrupted: the finished tasks are saved" if out else "interrupted", err=True)
        _exit(EXIT_INTERRUPTED)


# --------------------------------------------------------------------------- analyze
@main.command("analyze", short_help="How a rule's backward signal relates to the true gradient.")
@click.argument("rule", default="default")
@click.option("--family", default=None,
              help="Analyse the family's first held-out task [default: as for evaluate, else digits-mlp].")
@click.option("--task", "task_file", type=click.Path(path_type=Path), default=None, metavar="FILE.py",
              help="A task file: analyse its first held-out task.")
@click.option("--steps", type=click.IntRange(min=2), default=100, help="Training steps.")
@click.option("--message-step", type=click.IntRange(min=1), default=None,
              help="Step (1..--steps) whose message magnitudes are drawn on the graph [default: the last].")
@click.option("--adam-lr", type=PositiveFloat(), default=None,
              help="Adam's learning rate, a finite number > 0 [default: tuned at --steps].")
@click.option("--json", "as_json", is_flag=True, default=False,
              help='Print {"layers": [{"name", "cos_to_grad": [...], "norm_ratio": [...], ...}], "steps", '
                   '"diverged", ...}; strict JSON: an undefined value (zero gradient, diverged run) is null.')
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write analysis.json, alignment.png, update_alignment.png, curves.png, messages-*.png, summary.md.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help=_DEVICE_HELP)
@click.pass_context
@report_errors
def analyze_cmd(ctx: click.Context, rule: str, family: str | None, task_file: Path | None, steps: int,
                message_step: int | None,
                adam_lr: float | None, as_json: bool, out: Path | None, device: str) -> None:
    """Train one held-out network with RULE ('default', a run directory, a rule file, 'exact' or
    'fa') and record per layer and step the cosine, norm ratio and sign agreement between the
    rule's signal and the true gradient, its update against Adam's, and backward-state statistics;
    feedback alignment (+ Adam) is analysed beside it as the reference point.
    """
    import torch

    from ..evaluation import analysis
    from ..evaluation.run import task_family
    from ..tasks.registry import get_family
    from ..device import resolve as resolve_device

    if message_step is not None and message_step > steps:
        raise CLIError(f"--message-step {message_step} is after the last step; allowed: 1..{steps} (--steps {steps})")
    torch.set_num_threads(1)
    resolve_device(device)  # an unavailable device: one line before anything runs
    try:
        family = task_family(family, task_file, rule)
        spec = get_family(family).tasks("heldout", 1)[0]
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    seed = ctx.find_object(CLIState).seed if ctx.find_object(CLIState) else 0
    doc = analysis.report(rule, spec, steps, seed, out, None if message_step is None else message_step - 1, adam_lr,
                          device)
    if as_json:
        click.echo(dumps(doc, indent=1))
    else:
        from .tables import analyze_lines

        for line in analyze_lines(doc, steps):
            click.echo(line)
    if out:
        click.echo(f"results in {out}/ (summary.md, alignment.png, curves.png, messages-*.png)", err=True)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="mpbackprop")
