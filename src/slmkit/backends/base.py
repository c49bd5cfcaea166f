"""The boundary between the API / server / CLI and whatever runs a model: token ids in, token ids
out, with what the backend can do declared (Capabilities) rather than probed.

A backend need not have logits, a KV cache or batching (a cloud API has none of them): it says so
in `capabilities`, and LLM refuses the corresponding calls with a typed error. What it must have is
a tokenizer-like object (TokenizerLike: encode, decode, a streaming detokenizer, the chat
template) so that prompts can be rendered and answers decoded."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..options import GenerationOptions


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers. Callers check these instead of looking for attributes."""
    images: bool = False  # image parts in messages
    audio: bool = False  # audio parts in messages
    logits: bool = False  # logits(ids): full-vocabulary scores
    batching: bool = False  # enable_batching(): concurrent requests share steps
    prompt_cache: bool = False  # enable_prompt_cache(): a prompt sharing the last one's start reuses its KV
    sessions: bool = False  # new_session(): a conversation keeps its KV cache between turns
    beam_search: bool = False  # beam_search(ids, options)
    structured_output: bool = False  # json_schema / regex / grammar / response_format
    logprobs: bool = False  # TokenStep.logprob / top_logprobs when the options ask
    routing: bool = False  # TokenStep.routing (a mixture-of-experts model's choices) when the options ask
    token_ids: bool = True  # works on token ids (stream_tokens); False: on text (stream_chat), like a cloud API
    completion: bool = True  # plain-text completion (generate("text")); text-level backends: stream_completion
    tools: bool = False  # tools / tool_choice handled by the backend itself (text-level backends)
    embeddings: bool = False  # embed(rows): mean-pooled, L2-normalised final hidden states
    # the GenerationOptions (field names) it honours; None: every one. LLM refuses the others when
    # they are set (UnsupportedByBackendError): an option is never silently dropped
    options: frozenset[str] | None = None
    backend: str = "native"  # its name in errors and tables (the provider prefix of slmkit.load)


@dataclass(frozen=True)
class ModelDescription:
    """What a backend tells about its model (Ollama's /api/show and /api/tags, `slm run -v`)."""
    model_type: str  # the architecture ("phi3", "gemma3", ...)
    context_length: int
    parameters: int = 0  # quantized weights count as the n x k values they stand for
    weight_bytes: int = 0  # memory the weights take (as stored: packed, quantized)
    format: str = ""  # "safetensors", "gguf", or a remote API's name
    dtype: str = ""  # the compute dtype ("float32", "bfloat16")
    quantization: str = ""  # e.g. "int4 (24 layers, VNNI kernel)"; "" for float weights
    chat_template: str = ""
    # bytes the weights need at each precision ("float32", "bfloat16", "int8", "int4"); the planner's numbers
    ram_needed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendStats:
    """A snapshot of a backend's counters (/metrics, /health)."""
    tokens_generated: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens taken from a prompt cache instead of prefilled
    batching: bool = False  # continuous batching is on
    slots: int = 1  # requests that can run at once
    request_context: int = 0  # tokens one request can have (a batch slot's, or the model's context)
    batch_size: int = 0  # requests in the batch now
    batch_steps: int = 0  # forward passes the batch engine ran
    kv_slots_used: int = 0
    kv_bytes: int = 0  # memory of the batch's KV cache
    dead: str | None = None  # why the engine stopped for good (then every request fails), else None
    expert_hits: tuple[tuple[int, ...], ...] = ()  # MoE: per layer, per expert, tokens routed to it so far

    @property
    def healthy(self) -> bool:
        return self.dead is None


@dataclass
class TokenStep:
    token_id: int
    finish_reason: str | None = None  # "stop" or "length" on the last step
    logprob: float | None = None  # the model's log-probability of token_id (when asked for)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely ids and their log-probabilities
    routing: Any = None  # slmkit.results.TokenRouting of the pass that chose this token (return_routing)


@dataclass
class TextStep:
    """A piece of a text-level backend's answer (capabilities.token_ids False)."""
    text: str
    finish_reason: str | None = None  # "stop", "length" or "tool_calls" on the last piece
    prompt_tokens: int | None = None  # the provider's usage, on the last piece when it reports it
    completion_tokens: int | None = None
    tool_calls: list[Any] | None = None  # slmkit.tools.ToolCall list, on the last piece
    logprobs: list[Any] | None = None  # slmkit.results.TokenLogprob list for this piece, when asked


@dataclass
class SearchResult:
    """One returned sequence of a beam search, best first."""
    token_ids: list[int]  # generated tokens (ending with the end-of-sequence token when it stopped)
    score: float  # sum of log-probabilities / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" or "length"


class Session:
    """A conversation's state that a backend keeps between calls (its KV cache, for the native
    one). Made by Backend.new_session(); opaque to callers beyond these two counts."""

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation the backend holds (prompt and answers so far)."""
        return 0

    @property
    def last_prefill(self) -> int:
        """How many tokens the last call had to run through the model before generating."""
        return 0


class TokenizerLike(Protocol):
    @property
    def chat_template(self) -> str | None: ...

    @property
    def bos_token(self) -> str | None: ...

    @property
    def eos_token(self) -> str | None: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def create_stream(self) -> Any:
        """A streaming detokenizer: prime(prompt_ids), decode(token_id) -> text, flush() -> text."""
        ...


class TextBackend(Protocol):
    """What a text-level backend (a cloud API, a running Ollama) adds to Backend's descriptive half:
    messages in, text out. Its tokenizer may be None."""

    def stream_chat(self, messages: Sequence[Any], options: GenerationOptions, *, tools: Any = None,
                    tool_choice: Any = None, num_crops: int | None = None) -> Iterator[TextStep]:
        """Answer OpenAI-shaped messages (already checked: slmkit.text.chat.normalize_messages) with
        validated options that capabilities.options allows."""
        ...

    def stream_completion(self, prompt: str, options: GenerationOptions) -> Iterator[TextStep]:
        """Continue a plain text (capabilities.completion)."""
        ...


class Backend(Protocol):
    # read-only to callers (properties, so that a backend may hold them as plain attributes)
    @property
    def name(self) -> str: ...

    @property
    def model_type(self) -> str: ...

    @property
    def tokenizer(self) -> TokenizerLike: ...

    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size)."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def stream_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions,
                      session: Session | None = None, images: Any = None) -> Iterator[TokenStep]:
        """Generate after prompt_ids with validated options (temperature / top_p / top_k None:
        the model's defaults). With a session (from new_session()) the backend may reuse what it
        kept from the session's previous call. images (capabilities.images): the prompt's
        processor output (slmkit.vision.MultimodalInputs); prompt_ids then hold image k's
        num_image_tokens[k-1] placeholders as -k."""
        ...

    def process(self, prompt: str, images: Sequence[Any], num_crops: int | None = None) -> Any:
        """capabilities.images: a prompt with <|image_N|> tags and its images -> MultimodalInputs."""
        ...

    def new_session(self) -> Session: ...

    def logits(self, ids: Sequence[int], images: Any = None) -> Any:
        """float32 logits [len(ids), vocab] (capabilities.logits); images as for stream_tokens."""
        ...

    def embed(self, rows: Sequence[Sequence[int]]) -> Any:
        """capabilities.embeddings: float32 [len(rows), hidden] of validated, non-empty token-id rows
        that fit the context: each row's final-normed hidden states, averaged over its tokens and
        scaled to unit L2 norm (slmkit.engine.embedding)."""
        ...

    def beam_search(self, prompt_ids: Sequence[int], options: GenerationOptions) -> list[SearchResult]:
        """options.num_return_sequences best beams, best first (capabilities.beam_search)."""
        ...

    def enable_batching(self, slots: int, context: int | None) -> None: ...

    def enable_prompt_cache(self, on: bool = True) -> None: ...

    def describe(self) -> ModelDescription: ...

    def stats(self) -> BackendStats: ...

    def close(self) -> None: ...
