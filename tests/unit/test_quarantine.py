"""Requests that crashed the scheduler: which are refused, under which key, across restarts."""

from __future__ import annotations

from alise.core.job import Job
from alise.core.sampling import SamplingParams
from alise.scheduler.quarantine import Quarantine, request_key, suspects


def job(job_id: str, prompt=(1, 2, 3), max_tokens: int = 8) -> Job:
    return Job(job_id, list(prompt), SamplingParams(max_tokens=max_tokens), arrival_s=0.0)


def test_a_lone_suspect_is_refused_after_one_crash_others_after_two(tmp_path):
    q = Quarantine(str(tmp_path))
    q.record_crash([job("alone")], RuntimeError("boom"))
    q.record_crash([job("a"), job("b")], RuntimeError("boom"))
    again = Quarantine(str(tmp_path))  # a restart reads the file
    assert again.refusal(job("alone")) is not None and "only request involved" in again.refusal(job("alone"))
    assert again.refusal(job("a")) is None and again.refusal(job("b")) is None
    again.record_crash([job("a"), job("c")], ValueError("bad"))
    third = Quarantine(str(tmp_path))
    assert "2 times" in third.refusal(job("a")) and "ValueError: bad" in third.refusal(job("a"))
    assert third.refusal(job("b")) is None and third.refusal(job("c")) is None


def test_the_key_is_the_request_id_with_its_prompt_and_sampling():
    q = Quarantine(None)
    q.record_crash([job("pill")], RuntimeError("boom"))
    assert q.refusal(job("pill")) is not None
    assert q.refusal(job("pill", prompt=(1, 2, 4))) is None   # another request under that id
    assert q.refusal(job("pill", max_tokens=9)) is None
    assert request_key(job("pill")) != request_key(job("other"))


def test_the_job_being_handled_is_blamed_before_the_event_s():
    poison, bystander = job("poison"), job("bystander")

    def handle(jobs):
        for j in jobs:  # the innermost frame holding a job: this loop's
            if j.job_id == "poison":
                raise RuntimeError("crash")

    def loop():
        try:
            handle([bystander, poison])
        except RuntimeError as exc:
            return exc

    exc = loop()
    assert suspects(exc, [bystander, poison]) == [poison]
    assert suspects(RuntimeError("no traceback"), [bystander]) == [bystander]
