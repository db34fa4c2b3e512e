"""Stop strings over streamed text (pure): nothing of a stop string, nor after it, is released."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from alise.http.stops import StopStrings

TEXT = st.text(alphabet="ab c\u00e9", max_size=40)


def run(stops, deltas) -> tuple[str, bool]:
    matcher = StopStrings(stops)
    released = "".join(matcher.feed(d) for d in deltas) + matcher.flush()
    return released, matcher.matched


@given(text=TEXT, stops=st.lists(st.text(alphabet="ab c\u00e9", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_released_text_stops_right_before_a_stop_string(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in pairwise(bounds)]
    released, matched = run(stops, deltas)
    assert text.startswith(released)
    assert not any(s in released for s in stops)
    if not any(s in text for s in stops):
        assert released == text and not matched
    else:
        assert matched and any(text[len(released):].startswith(s) for s in stops)


def test_a_stop_split_across_deltas_is_held_back_then_dropped():
    matcher = StopStrings(["END"])
    assert matcher.feed("hello E") == "hello "
    assert matcher.feed("N") == ""
    assert matcher.feed("D and more") == "" and matcher.matched
    assert matcher.flush() == ""


def test_a_held_back_prefix_that_never_completes_is_released():
    matcher = StopStrings(["END"])
    assert matcher.feed("the EN") == "the "
    assert matcher.feed("d") == "ENd"
    assert matcher.feed(" fin E") == " fin "
    assert matcher.flush() == "E" and not matcher.matched


def test_no_stop_strings_pass_text_through():
    assert run([], ["a", "b"]) == ("ab", False)
