"""The one declared table of bsmon's record kinds: every field, its type and its range.

A record is a dict whose ``"k"`` names its kind. :data:`KINDS` says, for each kind, which
fields it must have, which it may have, and what each holds (type *and* range: a count is a
non-negative int, a time a finite number, a step at least 0), down to nested payloads such as
a step's ``noise`` (one layout per estimator) or a ``ranks`` record's columns. Everything that
reads or writes records derives from it: :func:`validate` (``bsmon.wire`` calls it on every
record received or read), docs/protocol.md (which lists the same table) and the per-step
columns below.

Extra fields are allowed, so a newer writer stays readable; a field that is present must hold
what the table says. Pure data and the standard library only: the probe imports this module.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

#: What a hello's ``v`` may be for a reader of this release: 1 wrote every step as JSON, 2 as
#: a binary frame (bsmon.wire). A monitor attaches only to a job of its own version.
PROTOCOL_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ProtocolError(ValueError):
    """Bytes that are not a valid bsmon frame or record."""


class InvalidRecord(ProtocolError):
    """A well-framed record that breaks the table: skipped and counted, the stream goes on."""


# -- field types -------------------------------------------------------------------------------
# Each checks one value and raises InvalidRecord naming where (``at``) and what was wrong.

def _fail(at: str, expected: str, value: Any) -> None:
    shown = repr(value)
    raise InvalidRecord(f"{at} is {shown[:60]}{'...' if len(shown) > 60 else ''}, not {expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Num:
    """A number (int or float); ``finite`` refuses NaN and infinities, ``min`` and ``max`` are
    inclusive, ``above`` is an exclusive lower bound (a duration something is divided by)."""
    finite: bool = True
    min: float | None = None
    max: float | None = None
    null: bool = False
    above: float | None = None

    def check(self, value: Any, at: str) -> None:
        if value is None and self.null:
            return
        if not _is_number(value):
            _fail(at, self.describe(), value)
        if self.finite and not math.isfinite(value):
            _fail(at, self.describe(), value)
        if ((self.min is not None and value < self.min) or (self.max is not None and value > self.max
                                                             and math.isfinite(value))
                or (self.above is not None and not value > self.above)):
            _fail(at, self.describe(), value)

    def describe(self) -> str:
        words = ["a finite number" if self.finite else "a number"]
        if self.above is not None:
            words.append(f"> {self.above:g}")
        if self.min is not None:
            words.append(f">= {self.min:g}")
        if self.max is not None:
            words.append(f"<= {self.max:g}" + ("" if self.finite else " when finite"))
        return " ".join(words) + (" or null" if self.null else "")


@dataclass(frozen=True)
class Int:
    """An int (not a bool) that fits 64 bits; ``min`` is inclusive (0 by default: counts are never negative)."""
    min: int | None = 0
    null: bool = False

    def check(self, value: Any, at: str) -> None:
        if value is None and self.null:
            return
        if (not isinstance(value, int) or isinstance(value, bool) or not -INT_LIMIT <= value < INT_LIMIT
                or (self.min is not None and value < self.min)):
            _fail(at, self.describe(), value)

    def describe(self) -> str:
        return "an int" + (f" >= {self.min}" if self.min is not None else "") + (" or null" if self.null else "")


#: Every int in a record fits a signed 64-bit integer (the history's arrays, numpy).
INT_LIMIT = 1 << 63


@dataclass(frozen=True)
class Str:
    choices: tuple[str, ...] | None = None
    null: bool = False

    def check(self, value: Any, at: str) -> None:
        if value is None and self.null:
            return
        if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
            _fail(at, self.describe(), value)

    def describe(self) -> str:
        what = f"one of {', '.join(self.choices)}" if self.choices else "a string"
        return what + (" or null" if self.null else "")


@dataclass(frozen=True)
class Bool:
    null: bool = False

    def check(self, value: Any, at: str) -> None:
        if not (isinstance(value, bool) or (value is None and self.null)):
            _fail(at, self.describe(), value)

    def describe(self) -> str:
        return "true or false" + (" or null" if self.null else "")


@dataclass(frozen=True)
class ListOf:
    """A list of ``item``; ``length`` fixes its size, ``min_length`` bounds it below."""
    item: Any
    length: int | None = None
    min_length: int = 0

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, list) or len(value) < self.min_length or (
                self.length is not None and len(value) != self.length):
            _fail(at, self.describe(), value)
        for i, entry in enumerate(value):
            self.item.check(entry, f"{at}[{i}]")

    def describe(self) -> str:
        size = f"{self.length} " if self.length is not None else ""
        return f"a list of {size}({self.item.describe()})"


@dataclass(frozen=True)
class MapOf:
    """An object from names to ``value`` (Monitor.log()'s scalars)."""
    value: Any

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            _fail(at, self.describe(), value)
        for name, entry in value.items():
            self.value.check(entry, f"{at}[{name!r}]")

    def describe(self) -> str:
        return f"an object of ({self.value.describe()})"


@dataclass(frozen=True)
class AnyObj:
    """A free-form object, read by its own parser (a Profile, an NVML snapshot, a device)."""
    null: bool = False

    def check(self, value: Any, at: str) -> None:
        if not (isinstance(value, dict) or (value is None and self.null)):
            _fail(at, self.describe(), value)

    def describe(self) -> str:
        return "an object" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Parsed:
    """An object whose layout its own parser declares (``"module:Class.method"``, imported on first
    use, on the monitor side): what that parser refuses is refused here, so it cannot fail later."""
    parser: str

    def check(self, value: Any, at: str) -> None:
        module, _, name = self.parser.partition(":")
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        if not isinstance(value, dict):
            _fail(at, self.describe(), value)
        try:
            target(value)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidRecord(f"{at} is not {self.describe()}: {exc}") from None

    def describe(self) -> str:
        return f"an object {self.parser} reads"


@dataclass(frozen=True)
class Field:
    name: str
    type: Any
    required: bool = True
    doc: str = ""


def _opt(name: str, type_: Any, doc: str = "") -> Field:
    return Field(name, type_, required=False, doc=doc)


@dataclass(frozen=True)
class Obj:
    """An object with declared fields (extra ones allowed), and cross-field ``rules``."""
    fields: tuple[Field, ...]
    rules: tuple[Callable[[dict, str], None], ...] = ()

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            _fail(at, "an object", value)
        for spec in self.fields:
            if spec.name in value:
                spec.type.check(value[spec.name], f"{at}.{spec.name}")
            elif spec.required:
                raise InvalidRecord(f"{at} lacks field {spec.name!r}")
        for rule in self.rules:
            rule(value, at)

    def describe(self) -> str:
        return "an object"


@dataclass(frozen=True)
class Tagged:
    """An object whose ``tag`` field picks its layout among ``variants``."""
    tag: str
    variants: dict[str, Obj]

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            _fail(at, "an object", value)
        variant = self.variants.get(value.get(self.tag))  # type: ignore[arg-type]
        if variant is None:
            _fail(f"{at}.{self.tag}", f"one of {', '.join(self.variants)}", value.get(self.tag))
        variant.check(value, at)

    def describe(self) -> str:
        return f"an object tagged by {self.tag!r}"


@dataclass(frozen=True)
class Kind:
    """One record kind: its fields (required and optional) and what it means."""
    name: str
    doc: str
    fields: tuple[Field, ...]
    rules: tuple[Callable[[dict, str], None], ...] = ()

    @property
    def obj(self) -> Obj:
        return Obj(self.fields, self.rules)


# -- cross-field rules -------------------------------------------------------------------------

def _lengths(rule: Callable[[dict], tuple[int, int, str]]) -> Callable[[dict, str], None]:
    """A rule that two lengths agree: ``rule`` gives (found, expected, what)."""
    def check(value: dict, at: str) -> None:
        found, expected, what = rule(value)
        if found != expected:
            raise InvalidRecord(f"{at}.{what} has {found} entries, not {expected}")
    return check


def _microbatch_mod(noise: dict, at: str) -> None:
    mod = noise.get("mod")
    if mod is not None and len(noise["micro"]) and len(mod) % len(noise["micro"]):
        raise InvalidRecord(f"{at}.mod has {len(mod)} entries, not a multiple of {len(noise['micro'])} passes")


def _per_example_mod(noise: dict, at: str) -> None:
    pe, big = noise.get("mod_pe"), noise.get("mod_big")
    if (pe is None) != (big is None) or (pe is not None and len(pe) != len(big)):
        raise InvalidRecord(f"{at}: mod_pe and mod_big must come together, one value per breakdown row each")


def _ddp_pre(noise: dict, at: str) -> None:
    pre = noise.get("pre")
    if pre is not None and len(pre) != len(noise["micro"]) + 1:
        raise InvalidRecord(f"{at}.pre has {len(pre)} entries, not {len(noise['micro']) + 1}")


def _counted_step_has_samples(step: dict, at: str) -> None:
    if step.get("flops", {}).get("total") is not None and step["n"] < 1:
        raise InvalidRecord(f"{at}.flops counts the FLOPs of a step of {step['n']} samples")


def _rank_columns(record: dict, at: str) -> None:
    size = record["world_size"]
    for name in RANK_COLUMNS:
        if len(record[name]) != size:
            raise InvalidRecord(f"{at}.{name} has {len(record[name])} entries for {size} ranks")


def _branch_curves(branch: dict, at: str) -> None:
    if len(branch["lrs"]) != len(branch["losses"]):
        raise InvalidRecord(f"{at}: lrs and losses must be equally long")


# -- the table ---------------------------------------------------------------------------------

TIME = Num(min=0)  # unix seconds
SECONDS = Num(min=0)  # a duration
#: Squared norms: an overflowing AMP step gives inf or NaN (skipped later). A finite one above
#: SQ_NORM_MAX is a corrupt record: float32 gradients of 10^12 parameters stay below 1e51, and
#: the estimators' products of norms and batch sizes must not overflow a float64.
SQ_NORM_MAX = 1e60
SQ_NORMS = ListOf(Num(finite=False, min=0, max=SQ_NORM_MAX))
MICRO = ListOf(Int(min=0), min_length=1)

#: A measured step's raw gradient norms, one layout per estimator (bsmon/probe/noise.py writes
#: them, bsmon/stats/noise.py reads them; docs/protocol.md explains each).
NOISE = Tagged("est", {
    "microbatch": Obj((
        Field("micro", MICRO, doc="samples in each micro-batch"),
        Field("g", Int(min=1), doc="parameter groups"),
        Field("acc", SQ_NORMS, doc="|.grad|^2 per group after each pass, row-major"),
        _opt("pre", SQ_NORMS, "|P .grad|^2 after each pass (Adam's preconditioner)"),
        _opt("mod", SQ_NORMS, "|.grad|^2 per breakdown row after each pass, row-major"),
    ), (_lengths(lambda v: (len(v["acc"]), len(v["micro"]) * v["g"], "acc")), _microbatch_mod)),
    "per_example": Obj((
        Field("batch", Int(min=1), doc="samples in the step"),
        Field("pe", SQ_NORMS, doc="sum of per-example |g_i|^2 per group"),
        Field("big", SQ_NORMS, doc="|.grad|^2 per group"),
        _opt("pre", ListOf(Num(finite=False, min=0), length=2), "[sum of |P g_i|^2, |P .grad|^2]"),
        _opt("mod_pe", SQ_NORMS, "sum of per-example |g_i|^2 per breakdown row"),
        _opt("mod_big", SQ_NORMS, "|.grad|^2 per breakdown row"),
    ), (_lengths(lambda v: (len(v["big"]), len(v["pe"]), "big")), _per_example_mod)),
    "ddp": Obj((
        Field("micro", MICRO), Field("g", Int(min=1)), Field("world", Int(min=1)),
        Field("norms", SQ_NORMS, doc="per pass before the synchronising one, then local and averaged totals"),
        _opt("pre", SQ_NORMS, "the same of the gradients rescaled by P: one per pass, then local and averaged"),
    ), (_lengths(lambda v: (len(v["norms"]), (len(v["micro"]) - 1) * v["g"] + 2, "norms")), _ddp_pre)),
})

SKIP_CAUSES = ("cleared", "raised")
FLOPS = Obj((
    Field("total", Num(min=0, null=True), doc="FLOPs of the step on rank 0, or null"),
    Field("dtype", Str(null=True)), _opt("tf32", Bool(null=True)), Field("reason", Str(null=True)),
))
SKIPPED = ListOf(Obj((Field("n", Int()), Field("mb", Int()), Field("why", Str(SKIP_CAUSES)))))

#: Per-rank columns of a ``ranks`` record: one entry per rank, null where a rank has not reported.
RANK_COLUMNS = ("step", "dt", "dt95", "busy", "n", "since_step", "since_report")
_RANK_TYPES = {"step": Int(null=True), "n": Int(null=True)}

BRANCH = Obj((
    Field("batch_size", Int(min=1)), Field("steps", Int()), Field("lr", Num()), Field("loss", Num(finite=False)),
    Field("lrs", ListOf(Num())), Field("losses", ListOf(Num(finite=False))),
    _opt("equiv_samples", Num(finite=False, null=True)), _opt("samples_ratio", Num(finite=False, null=True)),
    _opt("steps_ratio", Num(finite=False, null=True)),
), (_branch_curves,))

KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("hello", "First record of every session and of every stream.", (
        Field("v", Int(min=1), doc="protocol version"), Field("session", Str()), Field("name", Str()),
        Field("pid", Int()), Field("t0", TIME), Field("command", ListOf(Str())), Field("host", Str()),
        Field("user", Str()), Field("unit", Str(("samples", "tokens"))),
        _opt("cuda_visible_devices", Str(null=True)), _opt("cuda_device_order", Str(null=True)),
        _opt("pid_namespace", Str(null=True)), _opt("world_size", Int(min=1)), _opt("rank", Int()),
        _opt("data_parallel", Int(min=1)), _opt("tokens_per_sample", Int(min=1, null=True)),
        _opt("batch_size", Int(min=1, null=True)), _opt("horizon_samples", Num(min=0, null=True)),
        _opt("socket", Str(null=True)), _opt("frameworks", ListOf(Str())), _opt("devices", ListOf(AnyObj())),
        _opt("flops_per_sample", Num(min=0, null=True)),
    )),
    Kind("attach", "A monitor's first and only frame to the job.", (
        Field("v", Int(min=1)), Field("client", Str()),
        _opt("from", Int(min=0), "send the records from this byte of the session file: the end the "
             "job's checkpoint covers (bsmon/checkpoint.py)"),
    )),
    Kind("step", "One optimizer step.", (
        Field("step", Int(), doc="optimizer steps so far"), Field("t", TIME, doc="unix time at its end"),
        Field("dt", SECONDS, doc="since the previous step ended"), Field("n", Int(), doc="samples"),
        Field("mb", Int(), doc="micro-batches (backward passes)"), Field("dropped", Int(), doc="records dropped so far"),
        _opt("ph", ListOf(SECONDS, length=4), "phase marks, seconds from the previous step's end"),
        _opt("noise", NOISE), _opt("flops", FLOPS), _opt("skipped", SKIPPED),
        _opt("busy", SECONDS, "until this rank's gradients were ready"),
    ), (_counted_step_has_samples,)),
    Kind("scalars", "Values from Monitor.log(), tagged with their step.", (
        Field("step", Int()), Field("values", MapOf(Num(finite=False))),
    )),
    Kind("estimator", "Which noise estimator is active, what it covers, or why none applies.", (
        Field("name", Str(("microbatch", "per_example", "ddp"), null=True)), Field("reason", Str(null=True)),
        _opt("groups", ListOf(Str())), _opt("covered_fraction", Num(min=0, max=1, null=True)),
        _opt("second_moment", Bool()), _opt("precond_reason", Str(null=True)),
        _opt("modules", ListOf(Str())), _opt("module_params", ListOf(Int())),
    )),
    Kind("event", "Something a person should see.", (
        Field("t", TIME), Field("level", Str(("info", "warning", "error"))), Field("msg", Str()),
        _opt("traceback", Str()),
    )),
    Kind("profile_point", "One measured point of a throughput profile.", (
        Field("batch_size", Int(min=1)), Field("step_time_s", Num(above=0)), Field("samples_per_s", Num(above=0)),
        _opt("peak_memory_bytes", Int(null=True)),
    )),
    Kind("profile", "A finished throughput profile.", (Field("profile", Parsed("bsmon.profiling:Profile.from_dict")),)),
    Kind("gpu", "One NVML snapshot (written by a monitor into gpu.bsr).",
         (Field("snapshot", Parsed("bsmon.gpu.records:GpuSnapshot.from_record")),)),
    Kind("ranks", "Multi-process jobs: one column per field, one entry per rank.", (
        Field("t", TIME), Field("world_size", Int(min=1)),
        *(Field(name, ListOf(_RANK_TYPES.get(name, Num(min=0, null=True)))) for name in RANK_COLUMNS),
    ), (_rank_columns,)),
    Kind("branch_check", "A branch check's result (bsmon.stats.branch.BranchCheck).", (
        Field("t", TIME), Field("step", Int()), Field("samples_seen", Int()), Field("base_batch", Int(min=1)),
        Field("samples", Int()), Field("start_loss", Num(finite=False)),
        Field("branches", ListOf(BRANCH, min_length=1)),
        Field("b_crit", Num(finite=False, null=True)), Field("b_crit_low", Num(finite=False, null=True)),
        Field("b_crit_high", Num(finite=False, null=True)), Field("censored", Str(("above", "below"), null=True)),
        Field("b_simple", Num(finite=False, null=True)), Field("calibrate", Bool()),
        Field("confidence", Num(min=0, max=1)), Field("cost_samples", Int()), Field("cost_s", SECONDS),
        Field("tolerance_loss", Num(finite=False, null=True)), Field("within", Int(null=True)),
        Field("interval", Str(null=True)), _opt("cost_steps", Int()), _opt("cost_evals", Int()),
        _opt("reason", Str(null=True)),
    )),
    Kind("bye", "Last record: how the job ended.", (
        Field("t", TIME), Field("status", Str()), Field("code", Int(min=None, null=True)),
        _opt("error", Str(null=True)),
    )),
)}


#: The session's summary sidecar (summary.json, bsmon.store): what `bsmon ls` shows, kept current
#: by the job's publisher so listing never reads the records.
SUMMARY = Obj((
    Field("session", Str()), Field("steps", Int(), doc="the last step recorded"),
    Field("samples", Int(), doc="samples in the recorded steps (rank 0's, as in the step records)"),
    Field("status", Str(("running", "finished", "failed"))), Field("t", Num(min=0, null=True), doc="last record's time"),
    Field("bytes", Int(), doc="bytes of records.bsr this summary covers"), Field("code", Int(min=None, null=True)),
    _opt("b_opt", Int(min=1, null=True)), _opt("b_simple", Num(finite=False, null=True)),
    _opt("unit", Str(("samples", "tokens"))),
    _opt("scalars", ListOf(Str()), "the names logged (Monitor.log), in the order first logged"),
    _opt("lookups", Int(), "records a step's exported row looks up later in the file (ranks, branch_check)"),
))


def validate(record: Any) -> dict[str, Any]:
    """Return ``record`` if it matches its kind in :data:`KINDS`, else raise InvalidRecord."""
    if not isinstance(record, dict):
        raise InvalidRecord("record is not an object")
    kind = KINDS.get(record.get("k"))  # type: ignore[arg-type]
    if kind is None:
        raise InvalidRecord(f"unknown record kind {record.get('k')!r}")
    kind.obj.check(record, kind.name)
    if kind.name == "hello" and record["v"] not in READABLE_VERSIONS:
        newer = record["v"] > max(READABLE_VERSIONS)
        raise ProtocolError(
            f"the session was written with bsmon protocol v{record['v']}; this bsmon reads "
            f"v{', v'.join(map(str, READABLE_VERSIONS))}: " + ("upgrade bsmon" if newer else "use an older bsmon"))
    return record


# -- per-step columns --------------------------------------------------------------------------

@dataclass(frozen=True)
class StepColumn:
    """One per-step figure of the session model (``SessionModel._rows`` makes them, in this
    order): its name in the model's row and the history, its type and unit, its CSV header
    (docs/csv.md) and how the history bins it ("last" value or "sum"; None: not kept there).

    A new per-step figure is one line here, its producer in ``SessionModel._rows`` or
    ``_row_figures`` and its view. The CSV keeps this order, with the columns the export adds
    from other records (docs/csv.md) after ``step_time_s``.
    """

    name: str
    type: type
    unit: str
    bins: str | None = "last"
    csv: str | None = None  # None: the same as name

    @property
    def header(self) -> str:
        return self.csv or self.name


STEP_COLUMNS = (
    StepColumn("step", int, "count"),
    StepColumn("time", float, "s (Unix time; the CSV gives it as ISO 8601 UTC, then elapsed_s)"),
    StepColumn("batch_size", int, "samples (all micro-batches and ranks)", "sum"),
    StepColumn("micro_batches", int, "count"),
    StepColumn("skipped_steps", int, "count (so far in the session)"),
    StepColumn("step_time_s", float, "s", "sum"),
    StepColumn("b_simple", float, "samples"),
    StepColumn("b_simple_low", float, "samples"),
    StepColumn("b_simple_high", float, "samples"),
    StepColumn("noise_age_steps", int, "steps"),
    StepColumn("grad_sq", float, "(gradient units)^2"),
    StepColumn("trace_sigma", float, "(gradient units)^2 x samples"),
    StepColumn("noise_coverage", float, "fraction"),
    StepColumn("b_simple_precond", float, "samples"),
    StepColumn("b_simple_precond_low", float, "samples"),
    StepColumn("b_simple_precond_high", float, "samples"),
    StepColumn("b_noise", float, "samples"),
    StepColumn("b_opt", int, "samples", bins=None),  # re-evaluated on a cadence: the views read it from stats()
    StepColumn("b_opt_speedup", float, "ratio", bins=None),
)
#: Where each column is in a step row: its index in STEP_COLUMNS.
STEP_COLUMN_AT = {column.name: i for i, column in enumerate(STEP_COLUMNS)}


def markdown_table() -> str:
    """The table as docs/protocol.md shows it (``python -m bsmon.records`` prints it; a test keeps them equal)."""
    def fields(specs: tuple[Field, ...]) -> str:
        return "; ".join(f"`{f.name}`{'' if f.required else '?'}: {f.type.describe()}" for f in specs)

    rows = ["| kind | fields (`?`: optional) |", "| --- | --- |"]
    rows += [f"| `{kind.name}` | {fields(kind.fields)} |" for kind in KINDS.values()]
    rows += [f"| `step.noise` with `est` = `{tag}` | {fields(variant.fields)} |" for tag, variant in NOISE.variants.items()]
    rows += [f"| `step.flops` | {fields(FLOPS.fields)} |", f"| `step.skipped[i]` | {fields(SKIPPED.item.fields)} |",
             f"| `branch_check.branches[i]` | {fields(BRANCH.fields)} |", f"| `summary.json` | {fields(SUMMARY.fields)} |"]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())

