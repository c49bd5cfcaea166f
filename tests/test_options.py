"""One options type (GenerationOptions, one validator) and the Backend boundary: declared
capabilities, describe() / stats(), a typed session, beam search as a search option, and a backend
with no logits and no tokenizer of ours behind LLM."""
from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import slmkit
from slmkit import GeneratorParams, InvalidRequestError
from slmkit.api import LLM
from slmkit.backends.base import BackendStats, Capabilities, ModelDescription, Session, TokenStep
from slmkit.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

SRC = Path(slmkit.__file__).parent


@pytest.fixture(scope="module")
def llm(phi3_folders):
    return slmkit.load(phi3_folders("gqa"), dtype="float32")


# ------------------------------------------------------------------ one validator
BAD = [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_length": 1.5}, "max_length"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": 101}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"min_p": -0.5}, "min_p"),
    ({"typical_p": 0}, "typical_p"), ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": "7"}, "seed"),
    ({"stop": 5}, "stop"), ({"stop": ["a", 3]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_window": -1}, "repetition_window"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"no_repeat_ngram_size": 1.0}, "no_repeat_ngram_size"),
    ({"logit_bias": [1]}, "logit_bias"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {True: 1}}, "logit_bias"), ({"logit_bias": {-3: 1}}, "logit_bias"),
    ({"min_new_tokens": -1}, "min_new_tokens"), ({"min_length": "2"}, "min_length"),
    ({"scorers": [3]}, "scorers"), ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"), ({"n": 65}, "n"), ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"length_penalty": "x"}, "length_penalty"), ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"beam_width": 4}, "beam_width"),
]


@pytest.mark.parametrize("kw,param", BAD, ids=[f"{i}:{p}" for i, (_, p) in enumerate(BAD)])
def test_each_bad_option_is_named_by_the_one_validator(kw, param):
    with pytest.raises(InvalidRequestError) as e:
        GenerationOptions.from_kwargs(**kw)
    assert e.value.param == param
    if param != "beam_width":  # GeneratorParams builds on the same type and its checks
        with pytest.raises(InvalidRequestError) as e:
            GeneratorParams(**kw)
        assert e.value.param == param


def test_defaults_and_normalisation_live_in_one_place():
    o = GenerationOptions()
    assert o.max_new_tokens == DEFAULT_MAX_NEW_TOKENS and o.temperature is None and o.n == 1 and o.num_beams == 1
    o = GenerationOptions.from_kwargs(stop="x", scorers=print, temperature=1e-9, max_new_tokens=None)
    assert o.stop == ("x",) and o.scorers == (print,) and o.temperature == 0.0 and o.max_new_tokens is None
    assert o.update(seed=None, top_k=3).seed is None and o.update(top_k=3).top_k == 3
    p = GeneratorParams()  # ONNX Runtime GenAI's defaults: the limit is max_length, greedy
    assert p.max_new_tokens is None and p.temperature == 0.0 and p.top_k == 0 and p.top_p == 1.0


def test_the_server_bodies_map_onto_the_options_naming_their_own_fields():
    from slmkit.server import ollama_api, openai_api

    o = openai_api.options({"max_tokens": 7, "temperature": 0.5, "seed": -1, "stop": ["a"], "n": 2, "num_ctx": 64})
    assert isinstance(o, GenerationOptions)
    assert (o.max_new_tokens, o.temperature, o.seed, o.stop, o.n, o.max_length) == (7, 0.5, None, ("a",), 2, 64)
    for body, param in [({"max_tokens": 0}, "max_tokens"), ({"min_tokens": -1}, "min_tokens"),
                        ({"num_ctx": 0}, "num_ctx"), ({"top_p": 2}, "top_p"), ({"n": 100}, "n")]:
        with pytest.raises(InvalidRequestError) as e:
            openai_api.options(body)
        assert e.value.param == param
    o = ollama_api.options({"options": {"num_predict": -1, "repeat_penalty": 1.1, "num_ctx": 128}, "format": "json"})
    assert o.max_new_tokens is None and o.repetition_penalty == 1.1 and o.max_length == 128
    assert o.response_format == {"type": "json_object"}
    for opts, param in [({"num_ctx": 0}, "options.num_ctx"), ({"temperature": -1}, "options.temperature"),
                        ({"repeat_last_n": -5}, "options.repeat_last_n"), ({"seed": "x"}, "options.seed")]:
        with pytest.raises(InvalidRequestError) as e:
            ollama_api.options({"options": opts})
        assert e.value.param == param


def test_the_cli_flags_map_onto_the_options():
    from slmkit.cli import BASE_MODEL_MAX_NEW_TOKENS, generation_options, parse_args

    a = parse_args(["run", "m", "hi", "--temperature", "0.7", "--stop", "x", "--stop", "y"])
    o = generation_options(a, raw=False)
    assert o.temperature == 0.7 and o.stop == ("x", "y") and o.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert generation_options(a, raw=True).max_new_tokens == BASE_MODEL_MAX_NEW_TOKENS
    with pytest.raises(InvalidRequestError) as e:
        generation_options(parse_args(["run", "m", "hi", "--top-p", "3"]), raw=False)
    assert e.value.param == "top_p"


# ------------------------------------------------------------------ beam search as a search option
def test_generate_with_num_beams_is_beam_search(llm):
    kw = dict(num_beams=3, num_return_sequences=2, length_penalty=0.5, early_stopping=True, max_new_tokens=6)
    beams = llm.beam_search("Hello", **kw)
    outs = llm.generate("Hello", **kw)
    assert isinstance(outs, list) and len(outs) == 2
    assert [o.token_ids for o in outs] == [b.token_ids for b in beams]
    assert [o.score for o in outs] == [b.score for b in beams] and [o.text for o in outs] == [b.text for b in beams]
    assert outs[0].usage.completion_tokens == len(outs[0].token_ids)
    via = llm.generate("Hello", GenerationOptions(**kw))  # the same through an options object
    assert [o.token_ids for o in via] == [b.token_ids for b in beams]
    for bad, param in [({"stream": True}, "stream"), ({"stop": "x"}, "stop"), ({"logprobs": True}, "logprobs")]:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate("Hello", num_beams=2, **bad)
        assert e.value.param == param


def test_set_search_options_takes_num_beams_and_the_generator_refuses_it_by_name(llm):
    p = GeneratorParams()
    p.set_search_options(num_beams=4, num_return_sequences=2, length_penalty=1.2, do_sample=False)
    assert p.num_beams == 4 and p.num_return_sequences == 2
    with pytest.raises(InvalidRequestError) as e:
        p.set_search_options(num_beams=0)
    assert e.value.param == "num_beams"
    p = GeneratorParams()
    p.set_search_options(num_beams=4)
    with pytest.raises(InvalidRequestError) as e:
        slmkit.Generator(llm, p)
    assert e.value.param == "num_beams" and "LLM.generate" in str(e.value)


# ------------------------------------------------------------------ describe / stats / session
def test_describe_counts_the_weights_and_stats_count_the_tokens(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32")
    d = llm.describe()
    model = llm.engine.model
    assert isinstance(d, ModelDescription) and d.model_type == "phi3" and d.format == "safetensors"
    assert d.parameters == sum(p.numel() for p in model.parameters()) and d.dtype == "float32"
    assert d.weight_bytes >= 4 * d.parameters and d.context_length == llm.context_length and d.quantization == ""
    st = llm.stats()
    assert isinstance(st, BackendStats) and st.healthy and not st.batching and st.tokens_generated == 0
    assert st.request_context == llm.context_length
    out = llm.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True, temperature=0)
    assert llm.stats().tokens_generated == len(out.token_ids) == 4
    llm.enable_batching(2, 64)
    st = llm.stats()
    assert st.batching and st.slots == 2 and st.request_context == 64 and st.kv_bytes > 0 and st.batch_size == 0
    llm.generate([5, 6, 7], max_new_tokens=3, ignore_eos=True, temperature=0)
    assert llm.stats().batch_steps >= 2 and llm.stats().tokens_generated == 7  # the prefill gives the first
    llm.close()


def test_a_quantized_model_says_so(phi3_folders):
    llm = slmkit.load(phi3_folders("gqa"), dtype="float32", quant="int8")
    d = llm.describe()
    assert "quantized layers" in d.quantization and d.parameters > 0


def test_a_chat_session_is_a_typed_backend_object(llm):
    chat = llm.session(max_new_tokens=3, temperature=0)
    assert isinstance(chat._state, Session) and chat.cached_tokens == 0
    chat.send("Hi")
    first = chat.cached_tokens
    chat.send("And?")
    assert chat.cached_tokens > first and 0 < chat.last_prefill < chat.cached_tokens


# ------------------------------------------------------------------ a backend with no logits, no tokenizer of ours
class CharTokenizer:
    """One token per character (ids = code points); nothing from slmkit.text."""
    chat_template = None
    bos_token = eos_token = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))

    def create_stream(self) -> CharStream:
        return CharStream()


class CharStream:
    def prime(self, ids: Sequence[int]) -> None:
        pass

    def decode(self, token_id: int) -> str:
        return chr(token_id)

    def flush(self) -> str:
        return ""


class EchoBackend:
    """A remote-API-like backend: it answers by echoing the prompt reversed; it has no logits, no
    KV cache, no batching, no beam search."""
    name, model_type, context_length, vocab_size = "echo", "echo", 1000, 0x110000
    capabilities = Capabilities()

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.seen: list[GenerationOptions] = []
        self.generated = 0

    def stream_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions,
                      session: Session | None = None) -> Iterator[TokenStep]:
        self.seen.append(options)
        out = list(reversed(prompt_ids))[: options.max_new_tokens]
        for i, t in enumerate(out):
            self.generated += 1
            yield TokenStep(t, "length" if i == len(out) - 1 else None)

    def new_session(self) -> Session:
        return Session()

    def describe(self) -> ModelDescription:
        return ModelDescription("echo", self.context_length, format="remote")

    def stats(self) -> BackendStats:
        return BackendStats(tokens_generated=self.generated, request_context=self.context_length)

    def close(self) -> None:
        pass

    def enable_prompt_cache(self, on: bool = True) -> None:
        pass


def test_a_backend_without_logits_or_our_tokenizer_runs_behind_llm():
    backend = EchoBackend()
    llm = LLM(backend)
    out = llm.generate("abc", max_new_tokens=2, temperature=0.3, stop="zz")
    assert out.text == "cb" and out.finish_reason == "length" and out.usage.prompt_tokens == 3
    assert backend.seen[-1].temperature == 0.3 and backend.seen[-1].stop == ("zz",)
    assert "".join(c.text for c in llm.generate("xyz", stream=True)) == "zyx"
    assert [r.text for r in llm.generate("ab", n=2)] == ["ba", "ba"]
    assert llm.stats().tokens_generated == 9 and llm.describe().format == "remote"
    chat = llm.session()
    assert "yeh" in chat.send("hey").text and chat.cached_tokens == 0 and len(chat.messages) == 2
    for call, param in [(lambda: llm.logits([1, 2]), "logits"), (lambda: llm.enable_batching(2), "backend"),
                        (lambda: llm.generate("ab", num_beams=2), "num_beams"),
                        (lambda: llm.generate("ab", logprobs=True), "logprobs"),
                        (lambda: llm.generate("ab", regex="a+"), "response_format"),
                        (lambda: llm.engine, "model")]:
        with pytest.raises(InvalidRequestError) as e:
            call()
        assert e.value.param == param


# ------------------------------------------------------------------ the import rule
# the layers below plus two leaf modules that import nothing of slmkit but errors (checks) or nothing at all (streams)
ALLOWED = {"slmkit.api", "slmkit.backends", "slmkit.errors", "slmkit.options", "slmkit.checks", "slmkit.streams",
           "slmkit.vision"}  # images and video: decoding and limits


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the slmkit modules a file imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("slmkit"):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("slmkit")}
    return names


@pytest.mark.parametrize("path", sorted((SRC / "server").glob("*.py")) + sorted((SRC / "serving").glob("*.py"))
                         + sorted(SRC.glob("cli*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_server_and_cli_import_only_the_api_the_backends_the_errors_and_the_options(path):
    own = {"server": "slmkit.server", "serving": "slmkit.serving"}.get(path.parent.name, "slmkit.cli")
    package = own if own != "slmkit.cli" else "slmkit"
    for name in _imports(path, package):
        ok = any(name == a or name.startswith(a + ".") for a in ALLOWED | {own})
        ok = ok or (own == "slmkit.cli" and name.startswith("slmkit.cli_"))  # the CLI's own modules
        ok = ok or (own == "slmkit.cli" and name.startswith("slmkit.server"))  # `slm serve` starts the server
        ok = ok or (own == "slmkit.cli" and name.startswith("slmkit.serving"))  # `slm serve --ray`
        ok = ok or (own == "slmkit.cli" and name.startswith("slmkit.sources"))  # the CLI manages the model store
        ok = ok or (own == "slmkit.serving" and name.startswith("slmkit.server"))  # serving runs the server's app
        ok = ok or name == "slmkit.sources.catalog"  # the catalog's data (the chat page lists its names)
        ok = ok or name == "slmkit.__version__"  # the package's version string
        assert ok, f"{path.name} imports {name}"
