"""A scheduler whose job log cannot be written (a full disk) drops the records, not the jobs,
and says so in one line, not a traceback a job."""

from __future__ import annotations

import logging
import resource

from cluster_fixtures import cluster


async def test_jobs_finish_and_the_scheduler_serves_on_when_its_job_log_cannot_be_written(
        tiny_llama_dir, tmp_path, file_size_limit, caplog):
    caplog.set_level(logging.WARNING)
    job_log = tmp_path / "jobs.jsonl"
    async with cluster(str(tiny_llama_dir), job_log=str(job_log), worker_overrides={"max_model_len": 256},
                       max_model_len=256) as c:
        async with c.client() as client:
            await client.complete("first", max_tokens=3, ignore_eos=True)
            size = job_log.stat().st_size
            file_size_limit(size + 1)
            for i in range(3):
                done = await client.complete(f"while full {i}", max_tokens=3, ignore_eos=True)
                assert len(done.token_ids) == 3
            file_size_limit(resource.RLIM_INFINITY)
            await client.complete("after", max_tokens=3, ignore_eos=True)
            assert c.scheduler.engine.failure is None
    assert job_log.stat().st_size > size + 1  # records written again once there is room
    said = [r for r in caplog.records if "job log" in r.getMessage()]
    assert len(said) == 1 and not any(r.exc_info for r in caplog.records)
