"""Where a paused job's KV cache can be, and how each worker command moves it: one map.

``PLACES`` says, for each place, what the scheduler's memory planner, the worker's KV manager
(``alise.worker.kv_manager``) and the simulator (which runs that same KV manager) need to know
of it: its format, whether it is on the device or the host, its counterpart on the other side,
the places a paused job's KV may be downgraded to from it, and the name of a move that ends
there. The planner chooses targets and turns them into commands with :func:`actions_between`;
the KV manager applies a command with :func:`pause_target`, which is also how it decides what
to refuse. So the three cannot disagree about a transition.

Places: ``DEVICE`` (full precision), ``DEVICE_INT8`` / ``DEVICE_INT4`` (quantized in
place), ``HOST`` / ``HOST_INT8`` / ``HOST_INT4`` (swapped out in the format it had on the
device), ``NONE`` (dropped: the next step recomputes the whole sequence).

Pause actions, by place:

* ``KEEP``           on the device: stays; on the host: swapped back in (same format)
* ``QUANTIZE_INTk``  a device place with more than k bits -> ``DEVICE_INTk``
* ``SWAP_TO_HOST``   a device place -> the host place of the same format
* ``DROP``           anywhere -> ``NONE``

A resume brings any place back to full precision on the device (swap-in, then dequantize).
"""

from __future__ import annotations

from dataclasses import dataclass

from alise.core.commands import KvAction
from alise.core.job import KvPlace


@dataclass(frozen=True)
class Place:
    """What every part that moves KV knows of one place."""

    #: Bits per value: 16 is full precision, whatever the cache's dtype (NONE counts as 16:
    #: the recompute writes full precision).
    bits: int
    #: The KV takes device blocks there, or host blocks (NONE: neither).
    on_device: bool
    on_host: bool
    #: The place of the same format on the device (a swap-in's target) and on the host (a
    #: swap-out's target); None where there is none.
    device: KvPlace | None
    host: KvPlace | None
    #: Places a paused job's KV may move to from here to free device blocks (prefetch apart).
    downgrades: tuple[KvPlace, ...]
    #: Name of a move that ends here (``SchedulerCore.kv_moves``), unless it is a prefetch.
    label: str


_D, _D8, _D4 = KvPlace.DEVICE, KvPlace.DEVICE_INT8, KvPlace.DEVICE_INT4
_H, _H8, _H4 = KvPlace.HOST, KvPlace.HOST_INT8, KvPlace.HOST_INT4

PLACES: dict[KvPlace, Place] = {
    _D: Place(16, True, False, _D, _H, (_D8, _D4, _H, _H8, _H4, KvPlace.NONE), "keep"),
    _D8: Place(8, True, False, _D8, _H8, (_D4, _H8, _H4, KvPlace.NONE), "int8"),
    _D4: Place(4, True, False, _D4, _H4, (_H4, KvPlace.NONE), "int4"),
    _H: Place(16, False, True, _D, _H, (), "swap"),
    _H8: Place(8, False, True, _D8, _H8, (), "swap-int8"),
    _H4: Place(4, False, True, _D4, _H4, (), "swap-int4"),
    KvPlace.NONE: Place(16, False, False, None, None, (), "drop"),
}
#: The device place that holds KV quantized to each number of bits.
QUANTIZED_AT = {p.bits: place for place, p in PLACES.items() if p.on_device and p.bits < 16}
_QUANTIZE_BITS = {KvAction.QUANTIZE_INT8: 8, KvAction.QUANTIZE_INT4: 4}
_QUANTIZE_ACTION = {bits: action for action, bits in _QUANTIZE_BITS.items()}


class KvMoveRefused(ValueError):
    """A pause action that does not apply to the place the KV is in."""


def move_label(source: KvPlace, target: KvPlace) -> str:
    """How ``SchedulerCore.kv_moves`` counts a move from ``source`` to ``target``."""
    if PLACES[source].on_host and target is not KvPlace.NONE:
        return "prefetch"
    return PLACES[target].label


def pause_target(place: KvPlace, action: KvAction) -> KvPlace:
    """Where ``action`` takes KV that is at ``place``; raises :class:`KvMoveRefused`."""
    if action is KvAction.DROP:
        return KvPlace.NONE
    here = PLACES[place]
    if action is KvAction.KEEP:
        if not here.on_host:
            return place
        assert here.device is not None  # every host place has its device twin
        return here.device
    if action is KvAction.SWAP_TO_HOST:
        if not here.on_device:
            raise KvMoveRefused(f"cannot swap out KV at {place.value}")
        assert here.host is not None  # every device place has its host twin
        return here.host
    bits = _QUANTIZE_BITS[action]
    if not here.on_device or here.bits <= bits:
        raise KvMoveRefused(f"cannot quantize KV at {place.value} to int{bits}")
    return QUANTIZED_AT[bits]


def actions_between(source: KvPlace, target: KvPlace) -> tuple[KvAction, ...]:
    """The pause actions (in order) that move a paused job's KV from ``source`` to ``target``."""
    if target is source:
        return ()
    if target is KvPlace.NONE:
        return (KvAction.DROP,)
    src, dst = PLACES[source], PLACES[target]
    if src.on_host:
        if src.device is not target:
            raise KvMoveRefused(f"cannot move KV from {source.value} to {target.value}")
        return (KvAction.KEEP,)
    actions: tuple[KvAction, ...] = ()
    if dst.bits < src.bits:
        actions += (_QUANTIZE_ACTION[dst.bits],)
    elif dst.bits > src.bits:
        raise KvMoveRefused(f"cannot move KV from {source.value} to {target.value}")
    if dst.on_host:
        actions += (KvAction.SWAP_TO_HOST,)
    # Every step must be a transition of the table above.
    place = source
    for action in actions:
        place = pause_target(place, action)
    if place is not target:
        raise KvMoveRefused(f"cannot move KV from {source.value} to {target.value}")
    return actions
