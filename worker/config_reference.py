"""The configuration reference (docs/configuration.md), rendered from the settings model.

Everything comes from `worker.config.Settings` by introspection (pydantic v2 `model_fields`): one
section per nested section model (its class docstring is the section's introduction), and for every
setting its environment variable (prefix and nested delimiter from the model's own `model_config`), a
readable type, the default, the constraints of the field's metadata (ge/gt/le/lt, lengths) and the
field's `description`. The CLI flags that override a setting are found by asking `worker.cli` itself:
the flags of `notellm worker <action>` are read from the parser `worker.cli.configure` builds, and each
is mapped to the setting(s) it changes by passing two probe values through `worker.cli.settings_from`
(no argv is parsed). A flag of the "configuration" group that changes no setting is an error.

The output is deterministic (definition order, no environment values, no timestamps): `scripts/config-reference`
writes it, `tests/test_config_reference.py` compares the committed file with a fresh rendering.
No torch: this imports only the worker's settings and CLI modules.
"""
from __future__ import annotations

import argparse
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, SecretStr, ValidationError

OUTPUT = Path("docs/configuration.md")
SCRIPT = "scripts/config-reference"

# Defaults that are computed when the module is imported (they would make the reference change with
# every release): shown as what they mean, by setting path.
_DYNAMIC_DEFAULTS = {("worker_version",): "the package version (`worker.__version__`)"}

_PROBE_TEXT = ("probe-a", "probe-b", "17", "23", "2000", "3000", "70000", "80000", "auto")


@dataclass(frozen=True)
class Row:
    """One setting of the reference."""

    path: tuple[str, ...]          # ("kafka", "bootstrap_servers")
    env: str                       # NOTELLM_KAFKA__BOOTSTRAP_SERVERS
    annotation: Any                # the field's type annotation
    type_text: str
    default_text: str
    constraints: str
    description: str
    flags: tuple[str, ...] = ()    # CLI flags that set it, e.g. ("--bootstrap",)


@dataclass(frozen=True)
class Section:
    name: str                      # "kafka", or "" for top-level settings
    intro: str
    rows: tuple[Row, ...] = field(default_factory=tuple)


# -- types, defaults, constraints ------------------------------------------------------------------
def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _unannotated(tp: Any) -> tuple[Any, list]:
    """(the type, its Annotated metadata) for `Annotated[int, Field(ge=1)]`; (tp, []) otherwise."""
    if typing.get_origin(tp) is Annotated:
        inner, *meta = typing.get_args(tp)
        return inner, meta
    return tp, []


def type_text(tp: Any) -> str:
    """A readable type: `int`, `"a" | "b"` for a Literal, `int | "auto"`, `secret` for a SecretStr.
    `None` in a union is left out (an unset optional setting shows as "unset" in the default)."""
    tp, _ = _unannotated(tp)
    args = _union_args(tp)
    if args is not None:
        parts = [type_text(a) for a in args if a is not type(None)]
        return " | ".join(dict.fromkeys(parts))
    if typing.get_origin(tp) is Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(tp))
    if tp is SecretStr:
        return "secret"
    if inspect.isclass(tp) and issubclass(tp, Path):
        return "path"
    origin = typing.get_origin(tp)
    if origin is dict:
        k, v = (type_text(a) for a in typing.get_args(tp)) if typing.get_args(tp) else ("any", "any")
        return f"JSON object ({k} → {v})"
    if origin in (list, tuple, set, frozenset):
        inner = ", ".join(type_text(a) for a in typing.get_args(tp) if a is not Ellipsis) or "any"
        return f"JSON array ({inner})"
    if inspect.isclass(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_secret(tp: Any) -> bool:
    args = _union_args(tp)
    return tp is SecretStr or (args is not None and SecretStr in args)


def value_text(v: Any) -> str:
    """A value as it is written in the environment (JSON for containers, lower-case booleans)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, Path):
        return v.as_posix()
    return str(v)


def default_text(path: tuple[str, ...], info) -> str:
    if path in _DYNAMIC_DEFAULTS:
        return _DYNAMIC_DEFAULTS[path]
    if info.is_required():
        return "required"
    v = info.get_default(call_default_factory=True)
    if v is None:
        return "unset"
    if isinstance(v, SecretStr) or _is_secret(info.annotation):
        return "(secret)"
    text = value_text(v)
    return f"`{text}`" if text else '`""` (empty)'


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("multiple_of", "multiple of"),
           ("min_length", "length ≥"), ("max_length", "length ≤"))


def _bounds(metadata) -> list[str]:
    out = []
    for m in metadata:
        if hasattr(m, "metadata") and not any(hasattr(m, a) for a, _ in _BOUNDS):  # a FieldInfo in Annotated
            out += _bounds(m.metadata)
            continue
        for attr, sign in _BOUNDS:
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sign} {value_text(v)}")
    return out


def constraints_text(info) -> str:
    """The field's bounds (`≥ 10000, ≤ 655360`); a bound of one member of a union names its type
    (`int ≥ 1` for `Annotated[int, Field(ge=1)] | Literal["auto"]`)."""
    out = _bounds(info.metadata)
    tp, meta = _unannotated(info.annotation)
    out += _bounds(meta)
    for a in _union_args(tp) or ():
        inner, meta = _unannotated(a)
        out += [f"{type_text(inner)} {b}" for b in _bounds(meta)]
    return ", ".join(out)


# -- the model --------------------------------------------------------------------------------------
def _doc(cls) -> str:
    doc = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    """(path, FieldInfo) of every setting that is not itself a section, in definition order."""
    for name, info in model.model_fields.items():
        if _is_model(info.annotation):
            yield from _leaves(info.annotation, (*prefix, name))
        else:
            yield (*prefix, name), info


def env_name(settings_cls, path: tuple[str, ...]) -> str:
    cfg = settings_cls.model_config
    prefix = cfg.get("env_prefix") or ""
    delim = cfg.get("env_nested_delimiter") or "__"
    return (prefix + delim.join(path)).upper()


def sections(settings_cls=None, flags: dict[tuple[str, ...], tuple[str, ...]] | None = None) -> list[Section]:
    """The reference as data: top-level settings first (section name ""), then one section per nested
    model, in definition order. `flags`: path -> CLI flags (default: `cli_flags()`)."""
    if settings_cls is None:
        from worker.config import Settings as settings_cls
    if flags is None:
        flags = cli_flags()

    def row(path, info) -> Row:
        return Row(path=path, env=env_name(settings_cls, path), annotation=info.annotation,
                   type_text=type_text(info.annotation), default_text=default_text(path, info),
                   constraints=constraints_text(info), description=" ".join((info.description or "").split()),
                   flags=flags.get(path, ()))

    top, nested = [], []
    for name, info in settings_cls.model_fields.items():
        if _is_model(info.annotation):
            nested.append(Section(name, _doc(info.annotation),
                                  tuple(row((name, *p), i) for p, i in _leaves(info.annotation))))
        else:
            top.append(row((name,), info))
    out = [Section("", "", tuple(top))] if top else []
    return out + nested


def rows(settings_cls=None, flags=None) -> list[Row]:
    return [r for s in sections(settings_cls, flags) for r in s.rows]


# -- CLI flags ------------------------------------------------------------------------------------
def _probe_values(action: argparse.Action) -> list[Any]:
    if action.choices is not None:
        return list(action.choices)
    if action.nargs == 0:  # store_true / store_const
        return [v for v in (action.default, action.const) if v is not None] or [True, False]
    out = []
    for text in _PROBE_TEXT:
        if action.type is None:
            out.append(text)
            continue
        try:
            out.append(action.type(text))
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            pass
    return out


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


def cli_flags() -> dict[tuple[str, ...], tuple[str, ...]]:
    """Setting path -> the `notellm worker` flags that override it, e.g. ("kafka", "group_id") ->
    ("--group",). A flag only some actions take is written `--flag (action, ...)`. Found by probing
    `worker.cli.settings_from` with two valid values per flag (the environment cancels out)."""
    from worker import cli
    from worker.config import Settings

    parser = argparse.ArgumentParser(prog="notellm worker")
    cli.configure(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    paths = [p for p, _ in _leaves(Settings)]
    seen: dict[str, tuple[tuple[str, ...], ...]] = {}
    takes: dict[str, list[str]] = {}
    for action_name, p in sub.choices.items():
        config_dests = {a.dest for g in p._action_groups if (g.title or "").startswith("configuration")
                        for a in g._group_actions}
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            flag = max(a.option_strings, key=len)
            if flag not in seen:
                seen[flag] = _changed(cli.settings_from, a, paths)
                if not seen[flag] and a.dest in config_dests:
                    raise RuntimeError(f"`notellm worker {action_name} {flag}` is a configuration flag but changes no "
                                       "setting: map it in worker/cli.py settings_from")
            if seen[flag]:
                takes.setdefault(flag, []).append(action_name)
    actions = list(sub.choices)
    out: dict[tuple[str, ...], list[str]] = {}
    for flag, changed in seen.items():
        if not changed:
            continue
        where = takes[flag]
        text = flag if where == actions else f"{flag} ({', '.join(where)})"
        for path in changed:
            out.setdefault(path, []).append(text)
    return {k: tuple(v) for k, v in out.items()}


def _changed(settings_from, action: argparse.Action, paths) -> tuple[tuple[str, ...], ...]:
    results, error = [], None
    for v in _probe_values(action):
        try:
            s = settings_from(argparse.Namespace(**{action.dest: v}))
        except ValidationError as e:
            error = e
            continue
        results.append([_get(s, p) for p in paths])
    if not results and error is not None:
        raise error  # every probe invalid: most likely an invalid NOTELLM_* variable in this environment
    if len(results) < 2:
        return ()
    return tuple(p for i, p in enumerate(paths) if any(r[i] != results[0][i] for r in results[1:]))


# -- Markdown ---------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _type_cell(r: Row) -> str:
    return _code(r.type_text.replace("|", "\\|"))  # GFM: `\|` is a literal pipe in a table's code span


def _flag(text: str) -> str:
    flag, _, where = text.partition(" ")
    return f"`{flag}`" + (f" {where}" if where else "")


def render(settings_cls=None, flags=None) -> str:
    """docs/configuration.md as a string."""
    if settings_cls is None:
        from worker.config import Settings as settings_cls
    cfg = settings_cls.model_config
    prefix, delim = cfg.get("env_prefix") or "", cfg.get("env_nested_delimiter") or "__"
    secs = sections(settings_cls, flags)
    n = sum(len(s.rows) for s in secs)
    first = next((s for s in secs if s.name and s.rows), None)
    example = first.rows[0].env if first else env_name(settings_cls, ("section", "field"))
    unknown = env_name(settings_cls, (first.name if first else "section", "no_such_setting"))
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from worker/config.py by `{SCRIPT}` (worker/config_reference.py): do not edit by hand. -->",
        "",
        _doc(settings_cls),
        "",
        f"All {n} settings are read from the environment as `{prefix}<SECTION>{delim}<FIELD>` "
        f"({'case-sensitive' if cfg.get('case_sensitive') else 'case-insensitive'}), e.g. "
        f"`{example}`; a top-level setting is `{prefix}<FIELD>`. The flags of "
        "`notellm worker run | replay | backfill | redrive` override the environment (column *flag*; a flag "
        "that only some actions take names them). Values are written as in the environment: JSON for objects, "
        "`true`/`false` for booleans. *unset*: the variable is not set and the setting is off or left to the "
        "client library. *secret*: a `SecretStr`, never printed in logs or reprs; put it in a Kubernetes "
        "Secret, not a ConfigMap.",
        "",
        f"Misspellings: an unknown field inside a section (`{unknown}`) stops the worker at start-up (the "
        f"model forbids extra fields), but a variable that names no section at all, e.g. "
        f"`{example.replace(delim, '_', 1)}` with one underscore, is silently ignored.",
        "",
        "Sections: " + ", ".join(f"[{s.name or 'top level'}](#{s.name or 'top-level'})" for s in secs) + ".",
        "",
    ]
    for s in secs:
        lines += [f"## {s.name or 'top level'}", ""]
        if s.intro:
            lines += [s.intro, ""]
        lines += ["| variable | type | default | constraints | flag | description |",
                  "|---|---|---|---|---|---|"]
        for r in s.rows:
            lines.append("| " + " | ".join([
                _code(r.env), _type_cell(r), _cell(r.default_text), _cell(r.constraints),
                _cell(", ".join(_flag(f) for f in r.flags)),
                _cell(r.description)]) + " |")
        lines.append("")
    return "\n".join(lines)
