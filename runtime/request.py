"""What a generation request carries through the engine: sampling parameters, state, and the events it emits.

Pure Python (no torch), so the scheduler and its tests run anywhere. Parameter ranges follow the OpenAI API
(temperature 0..2, penalties -2..2, top_logprobs 0..20) plus vLLM's extras (top_k, min_p,
repetition_penalty); a bad value raises ``ValueError`` naming the field, which the server turns into a 400.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

_ids = itertools.count()


GREEDY_BELOW = 1e-5  # temperatures under this are greedy


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # same seed + same rung = same text
    presence_penalty: float = 0.0  # on generated tokens (OpenAI)
    frequency_penalty: float = 0.0  # on generated tokens (OpenAI)
    repetition_penalty: float = 1.0  # on prompt + generated tokens (HF / vLLM); 1 = off
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):  # as in OpenAI's API, one string is one stop string (not one per character)
            object.__setattr__(self, "stop", (self.stop,))
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0.0 <= self.temperature <= 2.0,
            "top_p": 0.0 <= self.top_p <= 1.0,  # 0 (OpenAI allows it): the top token alone
            "top_k": 0 <= self.top_k < 2**31,
            "min_p": 0.0 <= self.min_p <= 1.0,
            "presence_penalty": -2.0 <= self.presence_penalty <= 2.0,
            "frequency_penalty": -2.0 <= self.frequency_penalty <= 2.0,
            "repetition_penalty": 0.0 < self.repetition_penalty <= 10.0,
            "top_logprobs": 0 <= self.top_logprobs <= 20,
            # a torch generator takes a 64-bit seed; n choices use seed + i, so leave room above
            "seed": self.seed is None or -2**63 <= self.seed < 2**63 - 2**16,
            "stop": len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop),
        }
        if not checks["stop"]:  # what the rule is, not the whole (possibly long) list back
            raise ValueError(f"invalid stop: at most 4 non-empty strings, got {len(self.stop)} "
                             f"({sum(not (isinstance(s, str) and s) for s in self.stop)} empty or not a string)")
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")

    @property
    def greedy(self) -> bool:
        # below 1e-5 the sampler's temperature floor would sample at 1e-5, i.e. argmax but for exact ties: greedy,
        # as vLLM treats it (and the fast on-device greedy path serves it)
        return self.temperature < GREEDY_BELOW or self.top_k == 1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # an entity: equal only to itself (removal from queues compared whole prompts)
class Request:
    """One sequence: prompt tokens, the rung it runs at from prefill to its last token, and its progress."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    rung: int = 0
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    # every event the engine emitted for it, in order (what Engine.stream replays): kept here, with the request's
    # owner, not in an engine table that would outlive it
    events: list[TokenEvent] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if self.rung < 0:
            raise ValueError(f"rung must be >= 0, got {self.rung}")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Tokens this request's cache must hold at most (prompt + every new token)."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class TokenEvent:
    """What a stream yields per step: the new text (valid UTF-8 only), the token and, at the end, why."""

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    rung: int = 0
    error: str | None = None  # with finish_reason "error": what went wrong (the request was failed, not the engine)
    # the token is the eos / stop_token_ids token that ended generation: it was generated (usage counts it, as
    # vLLM does) but is no part of the text, so OpenAI's logprobs leave it out
    stop_token: bool = False
    # when the engine produced it (time.monotonic): latency measured here, not where a consumer read it (a slow
    # client or a busy event loop would inflate TPOT and TTFT, and with them the controller's latency rule)
    time_s: float = field(default_factory=time.monotonic)
