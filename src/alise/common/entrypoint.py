"""The shape every service's `main` shares: flags generated from its config dataclass, logging,
a validated config, a taken port refused in one line, then run until a signal.

Flags from fields (:func:`config_flags`): every scalar field of a frozen config dataclass, and
of the configs nested in it (``scheduling.policy``), is a flag ``--field-name`` with the
field's type, default and help (its ``#:`` comment): a ``Literal[...]`` type gives the choices,
a bool ``--name/--no-name``, a tuple a repeatable flag. A :class:`ConfigFlag` renames one, or
reads its default from the environment. So each default and each check is written once, in
the dataclass, and the parser's defaults are the config's.

A supervisor (`alise up`) builds each child's config and hands it over as the flags that give
its values (:func:`config_argv`); the child parses them back into an equal config.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import dataclasses
import functools
import inspect
import logging
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from alise.common.logs import configure_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigFlag:
    """How the flag of one config field differs from the plain ``--field-name``."""

    #: The field, ``name`` or ``nested.name`` for a field of a nested config.
    field: str
    #: Help text (default: the field's ``#:`` comment).
    help: str = ""
    #: The option without its dashes (default: the field's name). For a bool field, a named
    #: flag is a switch to the value that is not the default (``--fp32``).
    name: str = ""
    #: An environment variable whose value, when set, replaces the field's default.
    env: str = ""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.field.rpartition(".")[2]

    @property
    def option(self) -> str:
        return "--" + (self.name or self.dest).replace("_", "-")


@dataclass(frozen=True)
class _Kind:
    """What argparse needs for a field's type."""

    type: type
    choices: tuple | None = None
    optional: bool = False
    repeated: bool = False


def _kind(hint) -> _Kind:
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        [hint] = [t for t in typing.get_args(hint) if t is not type(None)]
        optional = True
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return _Kind(type(choices[0]), choices, optional)
    if typing.get_origin(hint) is tuple:
        return _Kind(typing.get_args(hint)[0], optional=optional, repeated=True)
    return _Kind(hint, optional=optional)


def field_owner(cls: type, path: str) -> tuple[type, dataclasses.Field]:
    """The dataclass that holds the field at ``path``, and that field."""
    head, _, rest = path.partition(".")
    [field] = [f for f in dataclasses.fields(cls) if f.name == head]
    if rest:
        return field_owner(typing.get_type_hints(cls)[head], rest)
    return cls, field


def field_default(cls: type, path: str):
    _, field = field_owner(cls, path)
    if field.default is dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _hint(cls: type, path: str):
    owner, field = field_owner(cls, path)
    return typing.get_type_hints(owner)[field.name]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's ``#:`` comment (the lines right above it), by name; {} when the source
    cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    [node] = ast.parse(source).body
    docs = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            comment, i = [], stmt.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                comment.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if comment:
                docs[stmt.target.id] = " ".join(comment)
    return docs


def field_help(cls: type, path: str) -> str:
    """The field's comment as flag help: a lower-case start, no closing period, no markup."""
    owner, field = field_owner(cls, path)
    text = (field_docs(owner).get(field.name) or field.name.replace("_", " ")).replace("``", "")
    first = text.split(maxsplit=1)[0]
    if not first[:2].isupper():  # "HOST:PORT", "HF" stay as they are
        text = text[0].lower() + text[1:]
    return text if text.endswith("..") else text.removesuffix(".")


def _paths(cls: type, prefix: str = "") -> Iterable[str]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _paths(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def config_flags(cls: type, *given: ConfigFlag, exclude: Iterable[str] = (),
                 only: Iterable[str] | None = None) -> tuple[ConfigFlag, ...]:
    """A flag for every scalar field of ``cls`` and of the configs nested in it, in field order:
    the one in ``given`` for its field, else the plain one. ``exclude`` leaves out fields or
    whole nested configs (``security``); ``only``, when given, keeps just these fields."""
    by_field = {flag.field: flag for flag in given}
    excluded = tuple(exclude)
    kept = None if only is None else set(only)
    flags = []
    for path in _paths(cls):
        if any(path == e or path.startswith(e + ".") for e in excluded):
            continue
        if kept is not None and path not in kept:
            continue
        kind = _kind(_hint(cls, path))
        if kind.optional and field_default(cls, path) is not None:
            raise TypeError(f"{cls.__name__}.{path}: a flag cannot give None, so an optional field's "
                            "default must be None")
        flags.append(by_field.pop(path, ConfigFlag(path)))
    if by_field:
        raise TypeError(f"{cls.__name__} has no flagged field {', '.join(by_field)}")
    return tuple(flags)


def _help(cls: type, flag: ConfigFlag, kind: _Kind, passed_to: str) -> str:
    text = (flag.help or field_help(cls, flag.field)).replace("%", "%%")
    default = field_default(cls, flag.field)
    if passed_to:
        return f"{text} (default: {passed_to}, {_shown(default)})"
    notes = [f"env {flag.env}"] if flag.env else []
    # A comment says what an unset value means, "(None: the model's)", '("" = none)': on the
    # command line that is the default.
    if default is None or kind.repeated:
        text = re.sub(r"\bNone(:| =)", "default:", text)
        if "default" not in text:
            notes.append("default: none")
    elif default == "":
        text = re.sub(r'""( =|:)', "default:", text)
        if "default" not in text:
            notes.append('default: ""')
    else:
        notes.append("default: %(default)s")
    return f"{text} ({'; '.join(notes)})" if notes else text


def _shown(value) -> str:
    return '""' if value == "" else str(value)


def add_config_flags(parser, config_cls: type, flags: Iterable[ConfigFlag], *, passed_to: str = "") -> None:
    """Adds each flag to ``parser`` (or an argument group) with its field's type, choices and
    default (or its environment variable's value).

    With ``passed_to`` (`alise up`'s flags for its children: "the workers'") the parsed
    default is None, so only a flag given is handed on, and the help names whose default
    applies."""
    taken = {action.dest for action in parser._actions}
    for flag in flags:
        if flag.dest in taken:
            raise TypeError(f"two flags set {flag.dest!r}: rename one (ConfigFlag.name)")
        taken.add(flag.dest)
        kind = _kind(_hint(config_cls, flag.field))
        default = None if passed_to or kind.repeated else field_default(config_cls, flag.field)
        if flag.env and os.environ.get(flag.env) and not passed_to:
            default = kind.type(os.environ[flag.env])
        kwargs = dict(dest=flag.dest, default=default, help=_help(config_cls, flag, kind, passed_to))
        if kind.type is bool and flag.name:  # a switch away from the default: --fp32
            kwargs["action"] = "store_false" if field_default(config_cls, flag.field) else "store_true"
        elif kind.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind.type, choices=kind.choices, metavar=flag.metavar)
            if kind.repeated:
                kwargs["action"] = "append"
        parser.add_argument(flag.option, **kwargs)


def config_values(args: argparse.Namespace, flags: Iterable[ConfigFlag]) -> dict:
    """The values ``args`` gives the flags' fields (None = not given), by field path."""
    values = {}
    for flag in flags:
        value = getattr(args, flag.dest)
        if value is not None:
            values[flag.field] = tuple(value) if isinstance(value, list) else value
    return values


def build_config(cls: type, values: Mapping[str, object], **given):
    """``cls(**given)`` with ``values`` (field path -> value, as :func:`config_values` gives
    them) set, nested configs built the same way (from ``given``'s, or from their defaults)."""
    top = dict(given)
    nested: dict[str, dict] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    hints = typing.get_type_hints(cls)
    for head, sub in nested.items():
        base = top.get(head)
        kept = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        top[head] = build_config(hints[head], sub, **kept)
    return cls(**top)


def _value(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def config_argv(config, flags: Iterable[ConfigFlag], *, always: Iterable[str] = ()) -> list[str]:
    """The flags that give ``config``'s values, where they differ from the fields' defaults
    (and the fields in ``always`` whatever their value), in the order of ``flags``."""
    always = set(always)
    argv: list[str] = []
    for flag in flags:
        value = _value(config, flag.field)
        if value is None or (flag.field not in always and value == field_default(type(config), flag.field)):
            continue
        if isinstance(value, bool):
            if not flag.name:
                argv.append(flag.option if value else "--no-" + flag.option[2:])
            elif value != field_default(type(config), flag.field):
                argv.append(flag.option)
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag.option, str(item)]
        else:
            argv += [flag.option, str(value)]
    return argv


def refuse_taken_ports(service: str, listeners: Mapping[str, str]) -> str | None:
    """A one-line refusal naming the first listener (flag -> HOST:PORT; "" or port 0: none to
    check) whose port is taken, and what holds it; None when all are free."""
    from alise.common.ports import PortTaken, check_free, split_address

    for flag, address in listeners.items():
        if not address or split_address(address)[1] == 0:
            continue
        try:
            check_free(address, f"alise {service} {flag}")
        except PortTaken as exc:
            return f"alise {service}: {exc}"
    return None


#: grpc's words when a port it was given cannot be bound (a port taken between our check and
#: its bind, or an address that is not this host's).
_GRPC_BIND_FAILED = re.compile(r"^Failed to bind to address (\S+?);")


def bind_failure(service: str, exc: BaseException) -> str | None:
    """The one-line message for grpc's bind failure, None for any other error."""
    match = _GRPC_BIND_FAILED.match(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is None:
        return None
    return (f"alise {service}: cannot listen on {match.group(1)}: the port is taken or the address "
            f"is not this host's")


def run_service(service: str, args: argparse.Namespace, config_from_args: Callable,
                serve: Callable[..., Awaitable[None]],
                listeners: Callable[..., Mapping[str, str]] = lambda config: {}) -> int:
    """Exit code 2 on a bad configuration (logged with the field and value), 1 when a port it
    must listen on (``listeners(config)``: flag -> address) is taken, 0 after a drain, or
    what ``serve`` returns (a service that failed returns non-zero)."""
    configure_logging(service)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        logger.error("bad configuration: %s", exc)
        return 2
    refusal = refuse_taken_ports(service, listeners(config))
    if refusal is None:
        try:
            return asyncio.run(serve(config)) or 0
        except RuntimeError as exc:
            refusal = bind_failure(service, exc)
            if refusal is None:
                raise
    print(refusal, file=sys.stderr, flush=True)
    return 1
