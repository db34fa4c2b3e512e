"""vLLM's logit adjustments on CUDA: overlapped steps with penalized, biased and min_tokens jobs
(decode graphs replayed or not) give the synchronous engine's tokens, and the adjustments, with
an output token still on the device, queue their work without waiting for the stream.
CUDA only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alise.core.sampling import SamplingParams
from alise.worker.model.overlap import PinnedUploads
from alise.worker.model.sampler import History, adjust_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
import test_async_steps as unit  # noqa: E402
import test_gpu_async_steps as gpu  # noqa: E402
import test_penalties_engine as penalties  # noqa: E402

from alise.worker.model.loader import load_model  # noqa: E402
from tinymodels import make_tiny_model_dir  # noqa: E402


@pytest.mark.parametrize("graphs", [True, False])
def test_overlapped_penalized_steps_on_cuda_give_the_synchronous_tokens(tmp_path, graphs):
    loaded = load_model(str(make_tiny_model_dir(tmp_path / "llama", "llama")), device="cuda", dtype="float16")
    commands, aborts = penalties.script(loaded.config.vocab_size)
    plans, expected = unit.make_plans(gpu.make_engine(loaded, graphs), commands, aborts)
    got = unit.run_overlapped(gpu.make_engine(loaded, graphs), plans, aborts)
    assert unit.outputs(got) == unit.outputs(expected)
    final = unit.streams(expected)
    assert len(final["min"][0]) == 13 and final["min"][0][12] == 2


def test_adjustments_never_wait_for_the_stream():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000, device="cuda")
    pending = torch.tensor([5, 6, 7], device="cuda")
    params = [SamplingParams(max_tokens=9, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3,
                             min_tokens=9, stop_token_ids=(11, 12)),
              SamplingParams(), SamplingParams(logit_bias={3: 50.0, 999: -100.0}),
              SamplingParams(temperature=0.0, frequency_penalty=-1.0)]
    histories = [History(list(range(20)) + [3, 3], 3, pending_row=1), None, None, History([4, 4, 4], 1)]
    upload = PinnedUploads(torch.device("cuda"))
    done = gpu.busy_stream(1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = adjust_logits(logits, params, histories, upload, eos_token_id=2, pending_ids=pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not done.query()  # queued behind the busy stream: nothing waited for it
    on_cpu = adjust_logits(logits.cpu(), params, histories, lambda v, d: torch.as_tensor(v, dtype=d),
                           eos_token_id=2, pending_ids=pending.cpu())
    torch.testing.assert_close(out.cpu(), on_cpu)
    assert torch.equal(out[1], logits[1])
