"""Traffic whose requests share prefixes: multi-turn conversations and a shared system prompt.

Chat template (:func:`render_chat`): each message is ``<|role|>\\n{text}\\n`` (system, user,
assistant) and a prompt ends with ``<|assistant|>\\n``. Turn k+1's prompt is turn k's prompt,
turn k's answer and the new user message, so all of turn k's prompt is a prefix of it; with a
system prompt, every request of the workload starts with the same text.

Conversations (:func:`build_conversations`) are made of AlpacaEval data, real on both sides:

* user turns are instructions drawn without replacement in a seeded order (reshuffled when the
  pool is used up); the turns of a conversation are unrelated instructions;
* the answers are one generator's real outputs to them: each conversation is answered by one
  generator, drawn per conversation from ``answers`` (all 12 by default), so conversations
  differ in how much their assistant says, as served conversations do (by their system
  prompt, what the user asks for, their topic); with one generator they differ by chance only;
* turns per conversation from a :class:`TurnsDistribution`; a conversation ends early when its
  next turn's prompt plus answer would pass ``max_context_tokens``;
* think time before each later turn: exponential with mean ``think_time_s``, counted from the
  end of the previous answer (``alise.tools.trace.Releases``);
* conversations start at ``rate`` / (turns per conversation), Poisson or Gamma, so the trace
  offers ``rate`` requests per second (``trace.mean_rate``).

Prefix share (:func:`prefix_share`): for each request, in arrival order, the longest prefix of
its prompt's tokens that an earlier request's prompt also starts with; over the trace, the
share of all prompt tokens so covered: the hit rate of a prefix cache that never evicts and
matches token by token, the best any prefix cache can do on the trace.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from alise.tools.trace import TraceRequest, arrival_times, data_dir

Tokenize = Callable[[Sequence[str]], list[list[int]]]
SYSTEM_PROMPT_SOURCE = "sharegpt/sharegpt_v3_filtered_1000.jsonl.gz"


def render_chat(system: str, turns: Sequence[tuple[str, str]], user: str) -> str:
    """The prompt of a request: the system prompt (if any), the earlier (user, assistant)
    turns, the new user message, and the assistant's header."""
    parts = [f"<|system|>\n{system}\n"] if system else []
    for question, answer in turns:
        parts.append(f"<|user|>\n{question}\n<|assistant|>\n{answer}\n")
    parts.append(f"<|user|>\n{user}\n<|assistant|>\n")
    return "".join(parts)


@dataclass(frozen=True)
class TurnsDistribution:
    """Turns per conversation: ``"N"`` always N, ``"A-B"`` uniform on A..B, ``"geom:M"``
    geometric on 1, 2, ... with mean M."""

    low: int
    high: int
    geometric_mean: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> TurnsDistribution:
        text = spec.strip()
        try:
            if text.startswith("geom:"):
                mean = float(text[5:])
                if not mean >= 1:
                    raise ValueError
                return cls(1, 0, mean)
            low, _, high = text.partition("-")
            dist = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"turns must be N, A-B or geom:MEAN (MEAN >= 1), got {spec!r}") from None
        if not 1 <= dist.low <= dist.high:
            raise ValueError(f"turns must be >= 1 and A <= B, got {spec!r}")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.geometric_mean:
            if self.geometric_mean == 1:
                return 1
            return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / self.geometric_mean))
        return rng.randint(self.low, self.high)


def system_prompt_text(num_tokens: int, tokenize: Tokenize, source: str | Path | None = None) -> str:
    """A fixed text of at least ``num_tokens`` tokens (a word more at most): the prompts of
    ``source`` (default: ShareGPT's ``sharegpt_v3_filtered_1000``), joined in file order and
    cut after the first word at which the count reaches ``num_tokens``."""
    from alise.predictor.datasets import load_records

    if num_tokens < 1:
        raise ValueError(f"system prompt tokens must be >= 1, got {num_tokens}")
    path = Path(source) if source else data_dir() / SYSTEM_PROMPT_SOURCE
    words = " ".join(r.prompt for r in load_records(path)).split()
    if len(tokenize([" ".join(words)])[0]) < num_tokens:
        raise ValueError(f"{path} has fewer than {num_tokens} tokens of text")
    low, high = 1, len(words)  # the fewest words that reach num_tokens
    while low < high:
        mid = (low + high) // 2
        if len(tokenize([" ".join(words[:mid])])[0]) >= num_tokens:
            high = mid
        else:
            low = mid + 1
    return " ".join(words[:low])


def with_system_prompt(requests: Sequence[TraceRequest], system: str,
                       tokenize: Tokenize) -> list[TraceRequest]:
    """Single-turn requests rendered after ``system`` (``query`` keeps each one's own text)."""
    prompts = [render_chat(system, [], r.text) for r in requests]
    counts = [len(ids) for ids in tokenize(prompts)]
    return [replace(r, prompt=p, prompt_tokens=n, query=r.text)
            for r, p, n in zip(requests, prompts, counts, strict=True)]


@dataclass
class _Turn:
    prompt_id: str
    query: str
    prompt: str
    prompt_tokens: int
    output_tokens: int


def _pool(answers: Mapping[str, Sequence[tuple[str, str, str]]]) -> tuple[list[str], dict[str, str]]:
    """Prompt ids every generator answered (in the first one's order), and their texts."""
    if not answers:
        raise ValueError("no generators to take answers from")
    common = set.intersection(*({pid for pid, _, _ in rows} for rows in answers.values()))
    first = next(iter(answers.values()))
    ids = [pid for pid, _, _ in first if pid in common]
    if not ids:
        raise ValueError("the generators answered no instruction in common")
    return ids, {pid: text for pid, text, _ in first}


def _conversation_turns(answers, *, num: int, turns: TurnsDistribution, seed: int, system: str,
                        max_context_tokens: int, tokenize: Tokenize) -> list[list[_Turn]]:
    ids, texts = _pool(answers)
    outputs = {m: {pid: out for pid, _, out in rows} for m, rows in answers.items()}
    lengths: dict[tuple[str, str], int] = {}
    rng = random.Random(seed)
    order: list[str] = []
    models = sorted(answers)
    convs: list[list[_Turn]] = []
    total = misses = 0
    while total < num:
        model, want, done = rng.choice(models), turns.sample(rng), []
        while len(done) < want and total < num:
            if not order:
                order = rng.sample(ids, len(ids))
            pid = order.pop()
            if (model, pid) not in lengths:
                lengths[model, pid] = max(len(tokenize([outputs[model][pid]])[0]), 1)
            prompt = render_chat(system, [(t.query, outputs[model][t.prompt_id]) for t in done], texts[pid])
            num_prompt = len(tokenize([prompt])[0])
            if num_prompt + lengths[model, pid] > max_context_tokens:
                if done:
                    break
                misses += 1  # in a row: an instruction whose answer alone is too long
                if misses > len(ids):
                    raise ValueError(f"max_context_tokens {max_context_tokens} fits no first turn")
                continue
            done.append(_Turn(pid, texts[pid], prompt, num_prompt, lengths[model, pid]))
            total, misses = total + 1, 0
        if done:
            convs.append(done)
    return convs


def build_conversations(answers: Mapping[str, Sequence[tuple[str, str, str]]], *, num: int, rate: float,
                        turns: TurnsDistribution, think_time_s: float, seed: int = 0,
                        bursty: bool = False, cv: float = 3.0, system: str = "",
                        max_context_tokens: int = 2048, tokenize: Tokenize | None = None
                        ) -> list[TraceRequest]:
    """``num`` requests in conversations (module doc). ``answers``: per generator, its
    (prompt id, instruction, output) records; the instructions every generator answered are
    the pool of user turns."""
    from alise.tools.trace import default_tokenizer

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if think_time_s < 0:
        raise ValueError(f"think time must be >= 0 s, got {think_time_s}")
    tokenize = tokenize or default_tokenizer()
    convs = _conversation_turns(answers, num=num, turns=turns, seed=seed, system=system,
                                max_context_tokens=max_context_tokens, tokenize=tokenize)
    starts = arrival_times(len(convs), rate * len(convs) / num, bursty=bursty, cv=cv, seed=seed + 1)
    think_rng = random.Random(seed + 3)
    out = []
    for k, (conv, start) in enumerate(zip(convs, starts, strict=True)):
        t = start
        for turn, x in enumerate(conv):
            think = 0.0
            if turn:
                think = think_rng.expovariate(1.0 / think_time_s) if think_time_s > 0 else 0.0
                t += think
            out.append(TraceRequest(x.prompt_id, x.prompt, x.prompt_tokens, x.output_tokens, round(t, 6),
                                    f"c{k}", turn, round(think, 6), x.query))
    return sorted(out, key=lambda r: r.arrival_s)


def load_answers(models: Sequence[str] | None = None) -> dict[str, list[tuple[str, str, str]]]:
    """(prompt id, instruction, output) of each AlpacaEval generator in ``models`` (file names
    without ``.jsonl.gz``; default: all of ``shared/data/alpaca_eval``)."""
    from alise.tools.trace import load_pairs

    folder = data_dir() / "alpaca_eval"
    available = sorted(p.name.removesuffix(".jsonl.gz") for p in folder.glob("*.jsonl.gz"))
    models = list(models) if models else available
    unknown = [m for m in models if m not in available]
    if unknown:
        raise ValueError(f"no AlpacaEval outputs of {', '.join(unknown)} in {folder} "
                         f"(there are: {', '.join(available)})")
    return {m: load_pairs(folder / f"{m}.jsonl.gz") for m in models}


@dataclass(frozen=True)
class PrefixShare:
    """Per request (in arrival order), prompt tokens an earlier prompt started with."""

    shared_tokens: list[int]
    prompt_tokens: list[int]

    @property
    def fraction(self) -> float:
        """Shared tokens over all prompt tokens: the best prefix-cache hit rate."""
        return sum(self.shared_tokens) / max(sum(self.prompt_tokens), 1)

    @property
    def mean_per_request(self) -> float:
        shares = [s / n for s, n in zip(self.shared_tokens, self.prompt_tokens, strict=True) if n]
        return sum(shares) / len(shares) if shares else 0.0


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_share(token_ids: Sequence[Sequence]) -> PrefixShare:
    """:class:`PrefixShare` of prompts given as token sequences in arrival order.

    The longest prefix a prompt shares with any earlier one is shared with one of its two
    neighbours in the lexicographic order of the earlier prompts (a common prefix only
    shortens moving away in that order), so each prompt costs a binary search and two
    comparisons."""
    seen: list[tuple] = []
    shared = []
    for ids in token_ids:
        key = tuple(ids)
        at = bisect.bisect_left(seen, key)
        best = max((_common_prefix(key, seen[j]) for j in (at - 1, at) if 0 <= j < len(seen)), default=0)
        shared.append(best)
        seen.insert(at, key)
    return PrefixShare(shared, [len(ids) for ids in token_ids])


#: ``alise trace`` flags of conversations, with their defaults (None when not given).
CONVERSATION_DEFAULTS = dict(turns="1-8", think_time_s=10.0, answers_from="all", max_context_tokens=2048)


def add_trace_arguments(parser) -> None:
    """``alise trace``'s flags for conversations and a shared system prompt."""
    d = CONVERSATION_DEFAULTS
    parser.add_argument("--turns", default=None, metavar="SPEC",
                        help=f"with --workload multiturn: turns per conversation, N, A-B (uniform) or "
                             f"geom:MEAN (default {d['turns']}; a conversation ends early where its next turn "
                             "would pass --max-context-tokens)")
    parser.add_argument("--think-time-s", type=float, default=None, metavar="S",
                        help="with --workload multiturn: mean think time before each later turn, from the "
                             f"end of the previous answer; exponential (default {d['think_time_s']:g}; 0 = none)")
    parser.add_argument("--answers-from", default=None, metavar="MODELS",
                        help="with --workload multiturn: AlpacaEval generators answering the conversations, "
                             "one drawn per conversation, comma-separated or 'all' (default all)")
    parser.add_argument("--max-context-tokens", type=int, default=None, metavar="N",
                        help="with --workload multiturn: a turn's prompt plus answer stays within N tokens "
                             f"(default {d['max_context_tokens']}, the simulator's max_model_len)")
    system = parser.add_mutually_exclusive_group()
    system.add_argument("--system-prompt-tokens", type=int, default=None, metavar="N",
                        help="prepend one system prompt of N tokens to every request (real text: "
                             "ShareGPT prompts, the same for every trace); requests are rendered with a "
                             "chat template")
    system.add_argument("--system-prompt-file", default=None, metavar="FILE",
                        help="prepend this file's text as the system prompt of every request")


def conversation_settings(args) -> dict:
    """The conversation flags' values (defaults filled in); ``ValueError`` when one is given
    without ``--workload multiturn``."""
    given = [k for k in CONVERSATION_DEFAULTS if getattr(args, k) is not None]
    if given and getattr(args, "workload", None) != "multiturn":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} go with --workload multiturn")
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in CONVERSATION_DEFAULTS.items()}


def system_prompt_from_args(args, tokenize: Tokenize) -> str:
    if args.system_prompt_file:
        text = Path(args.system_prompt_file).read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"{args.system_prompt_file}: empty system prompt")
        return text
    if args.system_prompt_tokens is not None:
        return system_prompt_text(args.system_prompt_tokens, tokenize)
    return ""


def multiturn_from_args(args, system: str, tokenize: Tokenize) -> tuple[list[TraceRequest], str]:
    """The ``multiturn`` workload of ``alise trace`` and where its answers came from."""
    s = conversation_settings(args)
    models = None if s["answers_from"] == "all" else [m.strip() for m in s["answers_from"].split(",") if m.strip()]
    answers = load_answers(models)
    requests = build_conversations(
        answers, num=args.num, rate=args.rate, turns=TurnsDistribution.parse(s["turns"]),
        think_time_s=s["think_time_s"], seed=args.seed, bursty=args.bursty, cv=args.cv, system=system,
        max_context_tokens=s["max_context_tokens"], tokenize=tokenize)
    if len(answers) == 1:
        return requests, f"real answers of {next(iter(answers))}"
    return requests, f"real answers, one generator per conversation among {', '.join(sorted(answers))}"


def prefix_line(requests: Sequence[TraceRequest], tokenize: Tokenize) -> str:
    """What ``alise trace`` prints about conversations and shared prefixes."""
    from alise.tools.trace import describe

    share = prefix_share(tokenize([r.prompt for r in requests]))
    stats = describe(requests)
    line = (f"prefix share {share.fraction:.1%} of prompt tokens (mean {share.mean_per_request:.1%} a "
            "request): the best hit rate of a prefix cache on this trace")
    if stats["num_conversations"]:
        line += (f"; {stats['num_conversations']} conversations, {stats['turns_mean']:.2f} turns on average, "
                 f"think time mean {stats['think_mean_s']:.1f} s (each later turn is sent that long after "
                 "the previous answer ends)")
    return line
