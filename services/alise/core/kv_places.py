"""Where a paused job's KV cache can be, and how each worker command moves it: one table.

The scheduler's memory planner chooses targets and turns them into commands with
:func:`actions_between`; the worker's KV manager (``alise.worker.kv_manager``) applies a
command with :func:`pause_target`, which is also how it decides what to refuse; the
simulator runs that same KV manager. So the three cannot disagree about a transition.

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

from alise.core.commands import KvAction
from alise.core.job import KvPlace

#: Host place of each device place (same format) and back.
HOST_OF = {KvPlace.DEVICE: KvPlace.HOST, KvPlace.DEVICE_INT8: KvPlace.HOST_INT8,
           KvPlace.DEVICE_INT4: KvPlace.HOST_INT4}
DEVICE_OF = {host: device for device, host in HOST_OF.items()}
#: Bits per value of each place (16: full precision, whatever the cache's dtype).
BITS = {KvPlace.DEVICE: 16, KvPlace.HOST: 16, KvPlace.DEVICE_INT8: 8, KvPlace.HOST_INT8: 8,
        KvPlace.DEVICE_INT4: 4, KvPlace.HOST_INT4: 4}
QUANTIZED_AT = {8: KvPlace.DEVICE_INT8, 4: KvPlace.DEVICE_INT4}
_QUANTIZE_BITS = {KvAction.QUANTIZE_INT8: 8, KvAction.QUANTIZE_INT4: 4}
_QUANTIZE_ACTION = {bits: action for action, bits in _QUANTIZE_BITS.items()}

DEVICE_PLACES = (KvPlace.DEVICE, KvPlace.DEVICE_INT8, KvPlace.DEVICE_INT4)
HOST_PLACES = (KvPlace.HOST, KvPlace.HOST_INT8, KvPlace.HOST_INT4)


class KvMoveRefused(ValueError):
    """A pause action that does not apply to the place the KV is in."""


def bits_of(place: KvPlace) -> int:
    return BITS.get(place, 16)


def pause_target(place: KvPlace, action: KvAction) -> KvPlace:
    """Where ``action`` takes KV that is at ``place``; raises :class:`KvMoveRefused`."""
    if action is KvAction.DROP:
        return KvPlace.NONE
    if action is KvAction.KEEP:
        return DEVICE_OF.get(place, place)
    if action is KvAction.SWAP_TO_HOST:
        if place not in DEVICE_PLACES:
            raise KvMoveRefused(f"cannot swap out KV at {place.value}")
        return HOST_OF[place]
    bits = _QUANTIZE_BITS[action]
    if place not in DEVICE_PLACES or bits_of(place) <= bits:
        raise KvMoveRefused(f"cannot quantize KV at {place.value} to int{bits}")
    return QUANTIZED_AT[bits]


def actions_between(source: KvPlace, target: KvPlace) -> tuple[KvAction, ...]:
    """The pause actions (in order) that move a paused job's KV from ``source`` to ``target``."""
    if target is source:
        return ()
    if target is KvPlace.NONE:
        return (KvAction.DROP,)
    if source in HOST_PLACES:
        if DEVICE_OF[source] is not target:
            raise KvMoveRefused(f"cannot move KV from {source.value} to {target.value}")
        return (KvAction.KEEP,)
    actions: tuple[KvAction, ...] = ()
    if bits_of(target) < bits_of(source):
        actions += (_QUANTIZE_ACTION[bits_of(target)],)
    elif bits_of(target) > bits_of(source):
        raise KvMoveRefused(f"cannot move KV from {source.value} to {target.value}")
    if target in HOST_PLACES:
        actions += (KvAction.SWAP_TO_HOST,)
    # Every step must be a transition of the table above.
    place = source
    for action in actions:
        place = pause_target(place, action)
    if place is not target:
        raise KvMoveRefused(f"cannot move KV from {source.value} to {target.value}")
    return actions
