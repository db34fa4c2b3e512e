"""Hypothesis strategies that build any protobuf message from its descriptor.

Integers span their full wire range, floats include NaN and infinities, enums include
values no enum names, strings include arbitrary Unicode, oneofs pick one member.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

_INTS = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_UINT64: (0, 2**64 - 1),
}


def _interesting_ints(lo: int, hi: int):
    edges = [v for v in (0, 1, -1, 2, 16, 1_000_000, lo, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -10), min(hi, 5000)))


def _scalar(field):
    t = field.type
    if t in _INTS:
        return _interesting_ints(*_INTS[t])
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.text(max_size=40)
    if t == F.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == F.TYPE_ENUM:
        return st.integers(-3, 12)
    raise TypeError(f"no strategy for field type {t}")


def messages(cls, depth: int = 0):
    """A strategy for instances of the generated message class ``cls``."""
    desc = cls.DESCRIPTOR

    @st.composite
    def build(draw):
        msg = cls()
        real_oneofs = [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))]
        oneof_members = {f.name for o in real_oneofs for f in o.fields}
        for oneof in [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))]:
            chosen = draw(st.sampled_from([None, *oneof.fields]))
            if chosen is not None:
                _set(draw, msg, chosen, depth)
        for field in desc.fields:
            if field.name in oneof_members or not draw(st.booleans()):
                continue
            _set(draw, msg, field, depth)
        return msg

    return build()


def _set(draw, msg, field, depth):
    is_message = field.type == F.TYPE_MESSAGE
    if field.is_repeated and not (is_message and field.message_type.GetOptions().map_entry):
        if is_message:
            if depth < 2:
                for sub in draw(st.lists(messages(_cls(msg, field), depth + 1), max_size=3)):
                    getattr(msg, field.name).add().CopyFrom(sub)
        else:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=6)))
    elif is_message:
        if field.message_type.GetOptions().map_entry or depth >= 2:
            return
        getattr(msg, field.name).CopyFrom(draw(messages(_cls(msg, field), depth + 1)))
    else:
        setattr(msg, field.name, draw(_scalar(field)))


def _cls(msg, field):
    return type(getattr(msg, field.name).add() if field.is_repeated else getattr(msg, field.name))
