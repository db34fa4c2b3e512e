"""The shape every service's `main` shares: flags read from a config dataclass, logging, a
validated config, a taken port refused in one line, then run until a signal.

A flag that sets a config field takes its default, type and choices from the field
(:class:`ConfigFlag`), so each is written once, in the dataclass; `alise up` adds the same
flags for its children and hands them on (:func:`config_argv`) only where they differ from
the field's default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import sys
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from alise.common.logs import configure_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigFlag:
    """The flag ``--field-name`` of one field of a frozen config dataclass."""

    field: str
    help: str
    #: Accepted values (default: any of the field's type).
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")


def _scalar_type(hint) -> type:
    """``int`` of ``int`` or ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        [hint] = [t for t in typing.get_args(hint) if t is not type(None)]
    return hint


def field_default(config_cls: type, name: str):
    [field] = [f for f in dataclasses.fields(config_cls) if f.name == name]
    return field.default


def add_config_flags(parser, config_cls: type, flags: Iterable[ConfigFlag], *, passed_to: str = "") -> None:
    """Adds each flag to ``parser`` (or an argument group) with its field's type and default.

    With ``passed_to`` (`alise up`'s flags for its children) the parsed default is None, so
    only a flag given is handed on, and the help names whose default applies."""
    hints = typing.get_type_hints(config_cls)
    for flag in flags:
        default = field_default(config_cls, flag.field)
        text = flag.help
        if passed_to and "default" not in text.lower():
            text += f" (default: the {passed_to}', {default})"
        parser.add_argument(flag.option, dest=flag.field, type=_scalar_type(hints[flag.field]),
                            default=None if passed_to else default, choices=flag.choices or None,
                            metavar=flag.metavar, help=text)


def config_values(args: argparse.Namespace, flags: Iterable[ConfigFlag]) -> dict:
    """The fields that ``args`` gives a value (None = not given), by field name."""
    return {f.field: getattr(args, f.field) for f in flags if getattr(args, f.field) is not None}


def config_argv(config, flags: Iterable[ConfigFlag]) -> list[str]:
    """The flags that give a service ``config``'s values where they differ from the defaults."""
    argv = []
    for flag in flags:
        value = getattr(config, flag.field)
        if value != field_default(type(config), flag.field):
            argv += [flag.option, str(value)]
    return argv


def refuse_taken_ports(service: str, listeners: Mapping[str, str]) -> str | None:
    """A one-line refusal naming the first listener (flag -> HOST:PORT; "" or port 0: none to
    check) whose port is taken, and what holds it; None when all are free."""
    from alise.cluster.ports import PortTaken, check_free, split_address

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
