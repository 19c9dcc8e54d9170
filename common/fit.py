"""Every prompt fits the model: the query and the profile items are cut the way LaMP cuts them, by the
model's token count, so that prompt + answer stay within the LLM's context window.

LaMP's recipe (LaMP-Benchmark/LaMP `prompts/prompts.py`: create_prompt_generator and the
create_*_prompt functions): the input keeps at most 60% of the budget when items are shown; the
items share the rest equally, in rank order, an item shorter than its share passing the unused tokens
on to the next (`saved_tokens`); each text keeps its head. Two differences, both for a chat LLM: the
budget is the context window less the answer's max tokens and the chat template's own tokens, and
tokens the items leave unused go back to the input (LaMP leaves them empty and then cuts the whole
string at the tokenizer's max_length). Only the variable texts are cut (the input's content after the
task's marker, each item's text); instructions, labels and titles stay whole.

A prompt that already fits is sent unchanged, so its cached answers stay valid. Counting:
- embedded (llama.cpp): exact, with the loaded model's tokenizer and chat template, n_ctx as the window;
- openai: the endpoint's tokenizer is unknown to the client (the API has no token-count route), so the
  count is an upper estimate: UTF-8 bytes / 2 per text (SmolLM2 needs at least 2.37 bytes per token on
  every review of the shared Amazon data, median 4.2; English BPE tokenizers average about 4) plus 8
  tokens per message and 48 for the template; the window is the `llm-context-window` setting (default
  2048, what `fedhydra llm serve` serves). A prompt cut this way is shorter than needed, never too long.
- an LLM that exposes neither (test doubles) gets its prompts unchanged.

Why not a library: LaMP's recipe is a loop over a Hugging Face tokenizer; the embedded model's
tokenizer lives in llama.cpp, and the openai backend has none. What fitting did is counted per LLM
object (`fit_stats`), so results can say, per method, how many prompts were cut and by how much.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .llm.base import LLMError
from .tasks import Task

QUERY_SHARE = 0.6  # LaMP: with items shown, the input keeps at most this share of the budget
BYTES_PER_TOKEN = 2.0  # the openai estimate (module docstring)
MESSAGE_TOKENS, TEMPLATE_TOKENS = 8, 48
GENERATION_TOKENS = 64  # free text that is no task's answer (LaMP-7's neutral rewrites); answers: Task.generation_tokens
ATTEMPTS = 6


class LlamaCounter:
    """Exact counts from the embedded model (EmbeddedLLM.token_ids / text_of / prompt_tokens)."""

    def __init__(self, model):
        self.model, self.context_window, self.exact = model, int(model.context_window), True

    def text_tokens(self, text: str) -> int:
        return len(self.model.token_ids(text))

    def cut(self, text: str, tokens: int) -> str:
        ids = self.model.token_ids(text)
        return text if len(ids) <= tokens else self.model.text_of(ids[:max(0, tokens)])

    def prompt_tokens(self, messages: list[dict]) -> int:
        return self.model.prompt_tokens(messages)


class EstimateCounter:
    """Upper estimates for an endpoint whose tokenizer the client cannot see (module docstring)."""

    exact = False

    def __init__(self, context_window: int):
        self.context_window = int(context_window)

    def text_tokens(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)

    def cut(self, text: str, tokens: int) -> str:
        raw = text.encode("utf-8")
        keep = int(max(0, tokens) * BYTES_PER_TOKEN)
        return text if len(raw) <= keep else raw[:keep].decode("utf-8", errors="ignore")

    def prompt_tokens(self, messages: list[dict]) -> int:
        return TEMPLATE_TOKENS + sum(MESSAGE_TOKENS + self.text_tokens(m["content"]) for m in messages)


def _backend(llm):
    """The model under wrappers (CachedLLM, recorders) that keep it as `.llm`."""
    seen = 0
    while hasattr(llm, "llm") and seen < 8:
        if hasattr(llm, "context_window"):
            break
        llm, seen = llm.llm, seen + 1
    return llm


def counter_for(llm) -> LlamaCounter | EstimateCounter | None:
    """How `llm`'s prompts are counted: exactly (it has a tokenizer), by estimate (only a window), or not at all."""
    model = _backend(llm)
    window = getattr(model, "context_window", None)
    if not window:
        return None
    if all(hasattr(model, a) for a in ("token_ids", "text_of", "prompt_tokens")):
        return LlamaCounter(model)
    return EstimateCounter(window)


@dataclass
class FitStats:
    """Prompts built for one LLM, and (tokens before, tokens after) of each one that had to be cut."""

    prompts: int = 0
    cuts: list = field(default_factory=list)

    def copy(self) -> "FitStats":
        with _LOCK:
            return FitStats(self.prompts, list(self.cuts))

    def minus(self, before: "FitStats") -> "FitStats":
        """What was built since `before` (a copy taken earlier)."""
        return FitStats(self.prompts - before.prompts, self.cuts[len(before.cuts):])

    def as_dict(self) -> dict:
        removed = [b - a for b, a in self.cuts]
        return {"prompts": self.prompts, "cut": len(self.cuts), "tokens_removed": sum(removed),
                "mean_removed": round(sum(removed) / len(removed), 1) if removed else 0.0,
                "most_removed": max(removed, default=0), "longest_before": max((b for b, _ in self.cuts), default=0)}


_STATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PLAIN_STATS: dict[int, FitStats] = {}  # LLM objects that cannot be weakly referenced, by id


_LOCK = threading.Lock()  # prompts are built in the request pool's threads (llm/pool.py)


def fit_stats(llm) -> FitStats:
    """The running FitStats of prompts built for `llm` (the object passed around, e.g. the CachedLLM)."""
    with _LOCK:
        try:
            return _STATS.setdefault(llm, FitStats())
        except TypeError:
            return _PLAIN_STATS.setdefault(id(llm), FitStats())


def answer_tokens(task: Task, llm=None) -> int:
    """Max tokens of one answer. A closed label set: the longest label's token count, over the label as written,
    capitalised and title-cased (a rating: 1 token; the metric reads the first digit, so a longer answer could
    only add words after it; a chat answer starts right after the template's "assistant" line, without a space).
    Without an exact tokenizer: the estimate's count. Generation: the task's `generation_tokens` (a tweet 64, a
    title 32)."""
    if task.kind == "generation" or not task.labels:
        return task.generation_tokens
    counter = counter_for(llm) if llm is not None else None
    if counter is None or not counter.exact:
        return max(math.ceil(len(lab.encode('utf-8')) / BYTES_PER_TOKEN) for lab in task.labels)
    forms = [f for lab in task.labels for f in (lab, lab.capitalize(), lab.title())]
    return max(counter.text_tokens(f) for f in forms)


def shares(lengths: Sequence[int], available: int, query_share: float = QUERY_SHARE) -> list[int]:
    """Tokens each text may keep: lengths[0] is the input's variable text, lengths[1:] the items' (best first).
    LaMP's split (module docstring): input at most query_share of `available` while items are shown, items equal
    shares with carry-over, then whatever the items leave goes back to the input."""
    if available < 0:
        raise ValueError(f"no room for any text: {available} tokens available")
    query, items = lengths[0], list(lengths[1:])
    if not items:
        return [min(query, available)]
    room = available - min(query, int(query_share * available))
    per, saved, kept = room // len(items), 0, []
    for n in items:
        allow = per + saved
        kept.append(min(n, allow))
        saved = allow - kept[-1]
    return [min(query, available - sum(kept)), *kept]


def fit_messages(llm, build: Callable[[list[str]], list[dict]], texts: list[str], max_tokens: int,
                 what: str = "prompt") -> list[dict]:
    """build(texts) with texts cut so that the prompt plus `max_tokens` fits `llm`'s context window.

    texts[0] is the input's variable part, texts[1:] the items' (best first); build must place them in the
    prompt without changing anything else. Raises LLMError naming the sizes when even empty texts do not fit."""
    messages = build(list(texts))
    counter = counter_for(llm)
    stats = fit_stats(llm)
    with _LOCK:
        stats.prompts += 1
    if counter is None:
        return messages
    budget = counter.context_window - max_tokens
    before = counter.prompt_tokens(messages)
    if before <= budget:
        return messages
    fixed = counter.prompt_tokens(build([""] * len(texts)))
    if fixed > budget:
        raise LLMError(f"{what}: its fixed part alone is {fixed} tokens, more than the {budget} the context window "
                       f"({counter.context_window}) leaves after the answer's {max_tokens}")
    lengths = [counter.text_tokens(t) for t in texts]
    available = budget - fixed
    for _ in range(ATTEMPTS):
        kept = shares(lengths, available)
        messages = build([counter.cut(t, k) for t, k in zip(texts, kept)])
        after = counter.prompt_tokens(messages)
        if after <= budget:
            with _LOCK:
                stats.cuts.append((before, after))
            return messages
        available -= after - budget + 2  # tokens merge or split at the cuts: try again with the excess off
    raise LLMError(f"{what}: could not cut {before} tokens to the {budget} that fit (context window "
                   f"{counter.context_window}, answer {max_tokens} tokens)")


def split_input(task: Task, task_input: str) -> tuple[str, str]:
    """(instruction head, variable content) of a task input: the content is what follows the task's marker
    (LaMP inputs end with it), the whole input when the marker is absent or empty."""
    at = task_input.find(task.marker) if task.marker else -1
    if at < 0:
        return "", task_input
    at += len(task.marker)
    return task_input[:at], task_input[at:]
