"""Protobuf <-> core conversions for the worker protocol and sampling parameters.

The one place where ``alise.v1`` messages meet the core's dataclasses; both the scheduler
and the worker use it, so the two sides cannot disagree about the wire.
"""

from __future__ import annotations

from alise.core.blocks import WorkerCapacity
from alise.core.commands import (
    AbortJobs,
    Admit,
    Command,
    HeldJob,
    JobOutput,
    KvAction,
    Pause,
    Refusal,
    Resume,
    Shutdown,
    StepPlan,
    StepReport,
    TokenLogprobs,
    ToWorker,
    Welcome,
)
from alise.core.job import FinishReason
from alise.core.sampling import SamplingParams
from alise.v1 import common_pb2, worker_pb2

_FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: common_pb2.FINISH_REASON_ABORTED,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}

_ACTION_TO_PB = {
    KvAction.KEEP: common_pb2.KV_ACTION_KEEP,
    KvAction.QUANTIZE_INT8: common_pb2.KV_ACTION_QUANTIZE_INT8,
    KvAction.QUANTIZE_INT4: common_pb2.KV_ACTION_QUANTIZE_INT4,
    KvAction.SWAP_TO_HOST: common_pb2.KV_ACTION_SWAP_TO_HOST,
    KvAction.DROP: common_pb2.KV_ACTION_DROP,
}
_ACTION_FROM_PB = {v: k for k, v in _ACTION_TO_PB.items()}


class WireError(ValueError):
    """A message that cannot be turned into a core object (the peer sent nonsense)."""


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB[reason]


def finish_from_pb(value: int) -> FinishReason | None:
    if value not in _FINISH_FROM_PB:
        raise WireError(f"unknown finish reason {value}")
    return _FINISH_FROM_PB[value]


def sampling_from_pb(msg: common_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Raises ValueError with a readable message on invalid parameters."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p if msg.HasField("min_p") else 0.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else 0.0,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else 0.0,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        min_tokens=msg.min_tokens,
        logit_bias=tuple(msg.logit_bias.items()),
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos)
    if params.seed is not None:
        msg.seed = params.seed
    if params.min_p:
        msg.min_p = params.min_p
    if params.presence_penalty:
        msg.presence_penalty = params.presence_penalty
    if params.frequency_penalty:
        msg.frequency_penalty = params.frequency_penalty
    if params.repetition_penalty != 1.0:
        msg.repetition_penalty = params.repetition_penalty
    msg.min_tokens = params.min_tokens
    msg.logit_bias.update(params.logit_bias)
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprobs_to_pb(logprobs: list[TokenLogprobs] | None, into) -> None:
    """Appends ``logprobs`` to a repeated ``TokenLogprobs`` field (a JobOutput's, a
    GenerateResponse's)."""
    for lp in logprobs or ():
        into.add(logprob=lp.logprob, top_ids=lp.top_ids, top_logprobs=lp.top_logprobs)


def logprobs_from_pb(repeated, num_tokens: int) -> list[TokenLogprobs] | None:
    """A repeated ``TokenLogprobs`` field as one entry per token (None when empty); raises
    WireError when it has entries but not one per token, or an entry's lists differ."""
    if not repeated:
        return None
    if len(repeated) != num_tokens:
        raise WireError(f"{len(repeated)} logprobs for {num_tokens} tokens")
    out = []
    for lp in repeated:
        if len(lp.top_ids) != len(lp.top_logprobs):
            raise WireError("a token's top_ids and top_logprobs differ in length")
        out.append(TokenLogprobs(lp.logprob, tuple(lp.top_ids), tuple(lp.top_logprobs)))
    return out


def to_worker_pb(message: ToWorker) -> worker_pb2.SchedulerMessage:
    """One message of a worker's stream, as it goes on the wire."""
    match message:
        case StepPlan():
            return worker_pb2.SchedulerMessage(plan=_plan_to_pb(message))
        case AbortJobs(job_ids, through):
            return worker_pb2.SchedulerMessage(abort=worker_pb2.AbortJobs(job_ids=job_ids, through_step_id=through))
        case Welcome(scheduler_id):  # an empty plan of step 0
            return worker_pb2.SchedulerMessage(plan=worker_pb2.StepPlan(step_id=0, scheduler_id=scheduler_id))
        case Shutdown(reason):
            return worker_pb2.SchedulerMessage(shutdown=worker_pb2.Shutdown(reason=reason))
    raise TypeError(f"not a message for a worker: {message!r}")


def to_worker_from_pb(pb: worker_pb2.SchedulerMessage) -> ToWorker:
    """Raises WireError on a message no scheduler sends."""
    match pb.WhichOneof("kind"):
        case "plan" if pb.plan.step_id == 0:
            return Welcome(pb.plan.scheduler_id)
        case "plan":
            return _plan_from_pb(pb.plan)
        case "abort":
            return AbortJobs(tuple(pb.abort.job_ids), pb.abort.through_step_id)
        case "shutdown":
            return Shutdown(pb.shutdown.reason)
    raise WireError("empty scheduler message")


def _plan_to_pb(plan: StepPlan) -> worker_pb2.StepPlan:
    pb = worker_pb2.StepPlan(step_id=plan.step_id, run_step=plan.run_step, chunks=plan.chunks, census=plan.census)
    for command in plan.commands:
        wc = pb.commands.add()
        match command:
            case Admit():
                wc.admit.job_id = command.job_id
                wc.admit.prompt_token_ids.extend(command.token_ids)
                wc.admit.sampling.CopyFrom(sampling_to_pb(command.sampling))
                wc.admit.num_generated = command.num_generated
                wc.admit.num_cached_tokens = command.num_cached_tokens
            case Pause():
                wc.pause.job_id = command.job_id
                wc.pause.kv_action = _ACTION_TO_PB[command.action]
                wc.pause.num_reusable_tokens = command.num_reusable_tokens
            case Resume():
                wc.resume.job_id = command.job_id
                wc.resume.num_cached_tokens = command.num_cached_tokens
    return pb


def _plan_from_pb(pb: worker_pb2.StepPlan) -> StepPlan:
    if pb.step_id < 1:
        raise WireError(f"a plan's step_id must be >= 1, got {pb.step_id}")
    commands: list[Command] = []
    for wc in pb.commands:
        match wc.WhichOneof("kind"):
            case "admit":
                a = wc.admit
                params = sampling_from_pb(a.sampling, default_max_tokens=1)
                commands.append(Admit(a.job_id, list(a.prompt_token_ids), params, a.num_generated,
                                      a.num_cached_tokens))
            case "pause":
                if wc.pause.kv_action not in _ACTION_FROM_PB:
                    raise WireError(f"unknown KV action {wc.pause.kv_action}")
                if wc.pause.num_reusable_tokens < 0:
                    raise WireError(f"num_reusable_tokens must be >= 0, got {wc.pause.num_reusable_tokens}")
                commands.append(Pause(wc.pause.job_id, _ACTION_FROM_PB[wc.pause.kv_action],
                                      wc.pause.num_reusable_tokens))
            case "resume":
                if wc.resume.num_cached_tokens < 0:
                    raise WireError(f"num_cached_tokens must be >= 0, got {wc.resume.num_cached_tokens}")
                commands.append(Resume(wc.resume.job_id, wc.resume.num_cached_tokens))
            case _:
                raise WireError("empty worker command")
    chunks = dict(pb.chunks)
    if any(n < 1 for n in chunks.values()):
        raise WireError("a chunk must feed at least one token")
    return StepPlan(step_id=pb.step_id, commands=commands, run_step=pb.run_step, chunks=chunks,
                    census=pb.census)


def report_to_pb(report: StepReport) -> worker_pb2.WorkerMessage:
    pb = worker_pb2.StepReport(
        step_id=report.step_id, step_duration_s=report.step_duration_s,
        num_free_device_blocks=report.num_free_device_blocks, num_seqs=report.num_seqs,
        num_context_tokens=report.num_context_tokens,
        chunk_starts=[start for start, _ in report.chunks], chunk_tokens=[n for _, n in report.chunks],
        census_job_ids=report.census_job_ids, num_admit_stand_in_tokens=report.num_admit_stand_in_tokens,
        num_resume_stand_in_tokens=report.num_resume_stand_in_tokens)
    for out in report.outputs:
        added = pb.outputs.add(job_id=out.job_id, token_ids=out.token_ids,
                               finish_reason=finish_to_pb(out.finish_reason), num_tokens=out.num_tokens)
        logprobs_to_pb(out.logprobs, added.logprobs)
    for r in report.refused:
        pb.refused.add(job_id=r.job_id, command=r.command, reason=r.reason)
    return worker_pb2.WorkerMessage(report=pb)


def report_from_pb(pb: worker_pb2.StepReport) -> StepReport:
    if pb.step_duration_s < 0 or pb.step_duration_s != pb.step_duration_s:
        raise WireError(f"step_duration_s must be a number >= 0, got {pb.step_duration_s}")
    if len(pb.chunk_starts) != len(pb.chunk_tokens):
        raise WireError("chunk_starts and chunk_tokens differ in length")
    if min(pb.num_seqs, pb.num_context_tokens, *pb.chunk_starts, *pb.chunk_tokens, 0) < 0:
        raise WireError("a step's shape cannot be negative")
    if min(pb.num_admit_stand_in_tokens, pb.num_resume_stand_in_tokens) < 0:
        raise WireError("stand-in tokens cannot be negative")
    outputs = [JobOutput(o.job_id, list(o.token_ids), finish_from_pb(o.finish_reason), o.num_tokens,
                         logprobs_from_pb(o.logprobs, len(o.token_ids)))
               for o in pb.outputs]
    refused = [Refusal(r.job_id, r.command, r.reason) for r in pb.refused]
    return StepReport(
        step_id=pb.step_id, outputs=outputs, step_duration_s=pb.step_duration_s,
        num_free_device_blocks=pb.num_free_device_blocks, refused=refused, num_seqs=pb.num_seqs,
        num_context_tokens=pb.num_context_tokens,
        chunks=list(zip(pb.chunk_starts, pb.chunk_tokens, strict=True)), census_job_ids=list(pb.census_job_ids),
        num_admit_stand_in_tokens=pb.num_admit_stand_in_tokens,
        num_resume_stand_in_tokens=pb.num_resume_stand_in_tokens)


#: Upper bounds on what a worker may claim (a lying or broken worker cannot make the
#: scheduler plan absurd batches).
HELLO_LIMITS = {"block_size": 4096, "num_device_blocks": 1 << 26, "num_host_blocks": 1 << 28,
                "max_model_len": 1 << 22, "max_num_seqs": 1 << 16, "max_num_batched_tokens": 1 << 22}


def held_to_pb(job: HeldJob) -> worker_pb2.HeldJob:
    return worker_pb2.HeldJob(job_id=job.job_id, token_ids=job.token_ids, num_generated=job.num_generated,
                              sampling=sampling_to_pb(job.sampling), num_computed=job.num_computed)


def held_from_pb(pb: worker_pb2.HeldJob, vocab_size: int) -> HeldJob:
    """Raises WireError on a held job no worker could hold."""
    n = len(pb.token_ids)
    if not pb.job_id or not 0 <= pb.num_generated < n or not 0 <= pb.num_computed <= n:
        raise WireError(f"held job {pb.job_id!r}: {n} tokens, {pb.num_generated} generated, "
                        f"{pb.num_computed} computed")
    if min(pb.token_ids) < 0 or max(pb.token_ids) >= vocab_size:
        raise WireError(f"held job {pb.job_id!r}: token ids outside the vocabulary [0, {vocab_size})")
    try:
        sampling = sampling_from_pb(pb.sampling, default_max_tokens=1)
    except ValueError as exc:
        raise WireError(f"held job {pb.job_id!r}: {exc}") from exc
    return HeldJob(pb.job_id, list(pb.token_ids), pb.num_generated, sampling, pb.num_computed)


def capacity_from_hello(hello: worker_pb2.WorkerHello) -> WorkerCapacity:
    if not hello.worker_id or len(hello.worker_id) > 128 or not hello.worker_id.isprintable():
        raise WireError("worker_id must be 1 to 128 printable characters")
    for name, limit in HELLO_LIMITS.items():
        if getattr(hello, name) > limit:
            raise WireError(f"{name} must be at most {limit}, got {getattr(hello, name)}")
    try:
        return WorkerCapacity(
            worker_id=hello.worker_id, block_size=hello.block_size,
            num_device_blocks=hello.num_device_blocks, num_host_blocks=hello.num_host_blocks,
            max_model_len=hello.max_model_len, max_num_seqs=hello.max_num_seqs,
            max_num_batched_tokens=hello.max_num_batched_tokens, block_bytes=hello.block_bytes,
            model_id=hello.model_id, prefix_caching=hello.prefix_caching,
            kv_cache_dtype=hello.kv_cache_dtype or "auto", tensor_parallel_size=hello.tensor_parallel_size or 1)
    except ValueError as exc:
        raise WireError(str(exc)) from exc
