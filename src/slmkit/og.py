"""ONNX Runtime GenAI's Python API over slmkit: scripts written for `onnxruntime_genai` run with
`import slmkit.og as og` on a Hugging Face folder (or any model slmkit.load takes).

    model = og.Model(path)
    processor = model.create_multimodal_processor()
    tokenizer_stream = processor.create_stream()
    inputs = processor("<|user|>\\n<|image_1|>\\nDescribe the image.<|end|>\\n<|assistant|>\\n",
                       images=og.Images.open("photo.jpg"))
    params = og.GeneratorParams(model)
    params.set_inputs(inputs)
    params.set_search_options(max_length=3072)
    generator = og.Generator(model, params)
    while not generator.is_done():
        generator.compute_logits()  # older ORT GenAI; a no-op step boundary here
        generator.generate_next_token()
        print(tokenizer_stream.decode(generator.get_next_tokens()[0]), end="", flush=True)

Text-only models: og.Tokenizer(model).encode(prompt) -> ids, generator.append_tokens(ids).
Token ids come back as numpy int32 arrays, as ORT GenAI returns them. What has no meaning here
is accepted and ignored, and said so where it is: execution-provider options (this runs on
PyTorch: og.Config.append_provider picks "cpu" or "cuda"), and the search options
past_present_share_buffer and chunk_size (memory layout and prefill chunking of ORT's graphs).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import LLM, load
from .engine.generator import Generator as _Generator
from .engine.generator import GeneratorParams as _Params
from .errors import InvalidRequestError, UnsupportedInputError

__all__ = ["Config", "Model", "Tokenizer", "TokenizerStream", "GeneratorParams", "Generator", "Images",
           "MultiModalProcessor"]

_ORT_TYPES = {"phi3_v": "phi3v"}  # ORT GenAI's names where they differ from config.json's model_type
_NO_OP_SEARCH = frozenset({"past_present_share_buffer", "chunk_size"})  # ORT graph knobs, nothing to do here
_PROVIDERS = {"cpu": "cpu", "cuda": "cuda"}


def _ids(tokens: Any, param: str) -> list[int] | list[list[int]]:
    """Token ids from a numpy array, torch tensor or (nested) list, as Python ints (1-D or 2-D)."""
    if isinstance(tokens, (str, bytes)):
        raise InvalidRequestError(f"must be token ids, got {type(tokens).__name__}; encode text with "
                                  "og.Tokenizer(model).encode first", param=param)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    try:
        arr = np.asarray(tokens)
    except ValueError as e:  # ragged nested lists
        raise InvalidRequestError(f"rows of token ids must have the same length ({e})", param=param) from None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequestError(f"must be integer token ids, got {arr.dtype} values", param=param)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise InvalidRequestError(f"must be a non-empty 1-D or 2-D array of token ids, got shape {arr.shape}",
                                  param=param)
    ids: list[int] | list[list[int]] = arr.astype(np.int64).tolist()
    return ids


class Config:
    """og.Config(path): where the model is and the device it runs on (append_provider("cuda"))."""

    def __init__(self, config_path: str | os.PathLike[str]):
        self.path = Path(config_path)
        self.device = "cpu"
        self.search: dict[str, Any] = {}  # overlay's "search" section: the GeneratorParams' defaults

    def clear_providers(self) -> None:
        self.device = "cpu"

    def append_provider(self, provider: str) -> None:
        if provider.lower() not in _PROVIDERS:
            raise InvalidRequestError(f"execution provider {provider!r} is not available here (slmkit runs on "
                                      f"PyTorch: {', '.join(_PROVIDERS)})", param="provider")
        self.device = _PROVIDERS[provider.lower()]

    def set_provider_option(self, provider: str, key: str, value: str) -> None:
        """Accepted and ignored: ORT execution-provider tuning (graph capture, ...) has no counterpart."""

    def overlay(self, json_text: str) -> None:
        """Merge ORT GenAI config JSON; its "search" section becomes the search options' defaults."""
        try:
            data = json.loads(json_text)
        except (TypeError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"is not JSON: {e}", param="overlay") from None
        search = data.get("search", {}) if isinstance(data, dict) else None
        if not isinstance(search, dict):
            raise InvalidRequestError('must be a JSON object whose "search" is an object', param="overlay")
        self.search.update(search)


class Model:
    """og.Model(path or og.Config): a model loaded through slmkit.load (an LLM is taken as it is).
    Keyword arguments go to slmkit.load (dtype, device, quant, ...)."""

    def __init__(self, config: str | os.PathLike[str] | Config | LLM, **load_kwargs: Any):
        self.search_defaults: dict[str, Any] = {}
        if isinstance(config, LLM):
            self.llm = config
            return
        if isinstance(config, Config):
            load_kwargs.setdefault("device", config.device)
            self.search_defaults = dict(config.search)
            config = config.path
        if not isinstance(config, (str, os.PathLike)):
            raise InvalidRequestError(f"must be a model path, an og.Config or an slmkit LLM, got "
                                      f"{type(config).__name__}", param="model")
        self.llm = load(os.fspath(config), **load_kwargs)

    @property
    def type(self) -> str:
        """The model type, as ORT GenAI names it ("phi3", "phi3v", "gemma3", ...)."""
        kind = str(self.llm.backend.model_type)
        return _ORT_TYPES.get(kind, kind)

    @property
    def device_type(self) -> str:
        """"CPU" or "CUDA", as ORT GenAI spells them."""
        return torch.device(self.llm.engine.device).type.upper()

    def create_multimodal_processor(self) -> MultiModalProcessor:
        return MultiModalProcessor(self)


class TokenizerStream:
    """Incremental detokenizer: decode(token) returns the text the token completes (maybe "")."""

    def __init__(self, model: Model):
        self._stream = model.llm.tokenizer.create_stream()

    def decode(self, token: Any) -> str:
        if isinstance(token, np.ndarray) and token.size == 1:
            token = token.item()
        if isinstance(token, (np.integer, torch.Tensor)):
            token = int(token)
        return str(self._stream.decode(token))


class Tokenizer:
    """og.Tokenizer(model): the model's tokenizer (BOS added as the model's tokenizer_config says)."""

    def __init__(self, model: Model):
        if not isinstance(model, Model):
            raise InvalidRequestError(f"needs an og.Model, got {type(model).__name__}", param="model")
        self._model = model
        self._tok: Any = model.llm.tokenizer  # slmkit.text.tokenizer.Tokenizer (or a GGUF one)

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise InvalidRequestError(f"must be a string, got {type(text).__name__}", param="text")
        return np.asarray(self._tok.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), longest] int32, shorter rows right-padded with pad_token_id (as ORT GenAI)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise InvalidRequestError("must be a non-empty list of strings", param="texts")
        rows = [self.encode(t) for t in texts]
        out = np.full((len(rows), max(len(r) for r in rows)), self.pad_token_id, dtype=np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def decode(self, tokens: Any) -> str:
        """Text of one sequence; image placeholders (negative ids) decode to nothing."""
        if isinstance(tokens, (list, tuple)) and not tokens:
            return ""
        ids = _ids(tokens, "tokens")
        if isinstance(ids[0], list):
            raise InvalidRequestError("decode takes one sequence; use decode_batch for several", param="tokens")
        return str(self._tok.decode([i for i in ids if i >= 0]))

    def decode_batch(self, tokens: Any) -> list[str]:
        rows = _ids(tokens, "tokens")
        return [self.decode(r) for r in (rows if isinstance(rows[0], list) else [rows])]

    def to_token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise InvalidRequestError(f"{token!r} is not a token of this model's vocabulary", param="token")
        return int(tid)

    def create_stream(self) -> TokenizerStream:
        return TokenizerStream(self._model)

    def apply_chat_template(self, messages: Any, *, template_str: str | None = None,
                            tools: str | None = None, add_generation_prompt: bool = True) -> str:
        """The model's chat template applied to messages (a JSON string, as ORT takes them, or a list)."""
        if template_str or tools:
            raise UnsupportedInputError("template_str and tools are not supported here: the model's own "
                                        "template is used (LLM.chat takes tools)", param="template_str")
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"is not a JSON list of messages: {e}", param="messages") from None
        return str(self._model.llm.render(messages, add_generation_prompt=add_generation_prompt).text)

    @property
    def bos_token_id(self) -> int:
        return -1 if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    @property
    def eos_token_ids(self) -> np.ndarray:
        return np.asarray(sorted(self._model.llm.engine.eos_token_ids), dtype=np.int32)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self._model.llm.engine.config, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
        return int(self._tok.eos_token_id) if self._tok.eos_token_id is not None else 0


class Images:
    """og.Images.open(*paths) / og.Images.open_bytes(*datas): images for a multimodal processor.
    Each is read and checked now (a missing, empty or undecodable file names its index and path)."""

    def __init__(self, images: list[Any]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def open(*image_paths: str | os.PathLike[str]) -> Images:
        if not image_paths:
            raise InvalidRequestError("needs at least one image path", param="images")
        for i, p in enumerate(image_paths):
            if not isinstance(p, (str, os.PathLike)):
                raise InvalidRequestError(f"image paths must be strings, got {type(p).__name__}",
                                          param=f"images[{i}]")
            if not Path(p).is_file():
                raise InvalidRequestError(f"image {i} ({os.fspath(p)}): no such file", param=f"images[{i}]")
        return Images(_load([os.fspath(p) for p in image_paths]))

    @staticmethod
    def open_bytes(*image_datas: bytes | bytearray | memoryview) -> Images:
        if not image_datas:
            raise InvalidRequestError("needs at least one image", param="images")
        for i, d in enumerate(image_datas):
            if not isinstance(d, (bytes, bytearray, memoryview)):
                raise InvalidRequestError(f"image data must be bytes, got {type(d).__name__}",
                                          param=f"images[{i}]")
        return Images(_load(list(image_datas)))


def _load(sources: list[Any]) -> list[Any]:
    """Decoded RGB images: slmkit.vision checks each one's bytes, pixels and format now."""
    from .vision.images import load_images

    return list(load_images(sources))


class MultiModalProcessor:
    """model.create_multimodal_processor(): prompt text with <|image_N|> tags plus og.Images ->
    the model's inputs (a MultimodalInputs) for GeneratorParams.set_inputs / Generator.set_inputs."""

    def __init__(self, model: Model):
        self._model = model

    def __call__(self, prompt: str | Sequence[str] | None = None, *, images: Images | None = None,
                 audios: Any = None, num_crops: int | None = None) -> Any:
        if audios is not None:
            raise UnsupportedInputError(f"model {self._model.llm.name!r} takes no audio", param="audios")
        if not isinstance(prompt, str) and isinstance(prompt, Sequence) and len(prompt) == 1:
            prompt = prompt[0]  # a batch of one prompt
        if not isinstance(prompt, str):
            raise InvalidRequestError("must be one prompt string (batches of prompts are not supported)",
                                      param="prompt")
        if images is not None and not isinstance(images, Images):
            raise InvalidRequestError(f"must be og.Images (og.Images.open(*paths)), got {type(images).__name__}",
                                      param="images")
        srcs = images.images if images is not None else None
        return self._model.llm.processor(prompt, images=srcs, num_crops=num_crops)

    def create_stream(self) -> TokenizerStream:
        return TokenizerStream(self._model)

    def decode(self, tokens: Any) -> str:
        return Tokenizer(self._model).decode(tokens)


class GeneratorParams:
    """og.GeneratorParams(model): search options (greedy and max_length = the context unless set)
    and, in older ORT GenAI scripts, the inputs (set_inputs, input_ids)."""

    def __init__(self, model: Model):
        if not isinstance(model, Model):
            raise InvalidRequestError(f"needs an og.Model, got {type(model).__name__}", param="model")
        self.model = model
        self.options = _Params()
        self.inputs: Any = None
        self.input_ids: Any = None  # ORT GenAI before 0.6: params.input_ids = tokens
        if model.search_defaults:
            self.set_search_options(**model.search_defaults)

    def set_search_options(self, **options: Any) -> None:
        """max_length, min_length, do_sample, temperature, top_k, top_p, repetition_penalty,
        batch_size, random_seed, no_repeat_ngram_size, num_beams (refused by the Generator), ...;
        past_present_share_buffer and chunk_size are accepted and ignored (ORT graph knobs)."""
        kw = {k: v for k, v in options.items() if k not in _NO_OP_SEARCH}
        if "random_seed" in kw:
            seed = kw.pop("random_seed")
            kw["seed"] = None if seed == -1 else seed  # ORT: -1 = a random seed
        self.options.set_search_options(**kw)

    def get_search_options(self) -> dict[str, Any]:
        o = self.options
        return {"max_length": o.max_length or self.model.llm.context_length, "min_length": o.min_length,
                "do_sample": bool(o.temperature), "temperature": o.temperature, "top_k": o.top_k,
                "top_p": o.top_p, "repetition_penalty": o.repetition_penalty, "batch_size": o.batch_size,
                "num_beams": o.num_beams, "random_seed": -1 if o.seed is None else o.seed}

    def set_guidance(self, type: str, data: str, enable_ff_tokens: bool = False) -> None:  # noqa: A002
        """Constrained decoding: type "json_schema", "regex" or "lark_grammar" (ORT GenAI's names)."""
        field = {"json_schema": "json_schema", "regex": "regex", "lark_grammar": "grammar"}.get(type)
        if field is None:
            raise InvalidRequestError(f"unknown guidance type {type!r} (json_schema, regex, lark_grammar)",
                                      param="type")
        for name in ("json_schema", "regex", "grammar"):
            setattr(self.options, name, data if name == field else None)
        self.options.validate()

    def set_inputs(self, inputs: Any) -> None:
        """The processor's output, appended when the Generator is made (older ORT GenAI)."""
        self.inputs = _check_inputs(inputs)


def _check_inputs(inputs: Any) -> Any:
    if not hasattr(inputs, "input_ids"):
        raise InvalidRequestError(f"must be a multimodal processor's output, got {type(inputs).__name__}",
                                  param="inputs")
    return inputs


class Generator:
    """og.Generator(model, params): step-by-step decoding of params.batch_size rows."""

    def __init__(self, model: Model, params: GeneratorParams):
        if not isinstance(model, Model) or not isinstance(params, GeneratorParams):
            raise InvalidRequestError("og.Generator(model, params) needs an og.Model and og.GeneratorParams",
                                      param="params")
        self._model = model
        self._gen = _Generator(model.llm, params.options)
        self._image_ids: dict[int, int] = {}  # the engine's image token ids -> the processor's -k
        if params.inputs is not None:
            self.set_inputs(params.inputs)
        elif params.input_ids is not None:
            self.append_tokens(params.input_ids)

    def set_inputs(self, inputs: Any) -> None:
        """Append a multimodal processor's output: its token ids and images."""
        inputs = _check_inputs(inputs)
        if getattr(inputs, "pixel_values", None) is None:
            self._gen.append_tokens(inputs.input_ids.tolist())
            return
        start = len(self._gen.get_sequence(0))
        self._gen.append_inputs(inputs)
        ours = self._gen.get_sequence(0)[start:]
        self._image_ids.update((a, int(b)) for a, b in zip(ours, inputs.input_ids.tolist()) if a < 0)

    def append_tokens(self, tokens: Any) -> None:
        """Token ids for every row: 1-D for one row, [batch_size, n] for several (og.Tokenizer.encode /
        encode_batch). Right-padded rows of different lengths are refused: slmkit's Generator
        decodes rows of equal length."""
        ids = _ids(tokens, "tokens")
        if ids and isinstance(ids[0], list):
            self._check_padding(ids)
        self._gen.append_tokens(ids)

    def _check_padding(self, rows: list[list[int]]) -> None:
        pad = Tokenizer(self._model).pad_token_id
        tails = {len(r) - len(list(_rstrip(r, pad))) for r in rows}
        if len(tails) > 1:
            raise InvalidRequestError("rows are padded to different lengths: this Generator decodes rows of "
                                      "equal length (append one prompt per generator, or prompts of equal "
                                      "token length)", param="tokens")

    def is_done(self) -> bool:
        return self._gen.is_done()

    def compute_logits(self) -> None:
        """Older ORT GenAI's separate step; generate_next_token computes the logits it needs."""

    def generate_next_token(self) -> None:
        self._gen.generate_next_token()

    def get_next_tokens(self) -> np.ndarray:
        return np.asarray(self._gen.get_next_tokens(), dtype=np.int32)

    def get_sequence(self, index: int) -> np.ndarray:
        """Row index's tokens; image placeholders as the processor gave them (-k for image k)."""
        seq = self._gen.get_sequence(int(index) if isinstance(index, np.integer) else index)
        return np.asarray([self._image_ids.get(t, t) if t < 0 else t for t in seq], dtype=np.int32)

    def token_count(self) -> int:
        return len(self._gen.get_sequence(0))

    def get_logits(self) -> np.ndarray:
        """float32 [batch_size, vocab]: the logits the next token is chosen from."""
        return self._gen.get_logits().float().cpu().numpy()

    def set_logits(self, logits: Any) -> None:
        self._gen.set_logits(torch.as_tensor(np.asarray(logits, dtype=np.float32)))

    def rewind_to(self, new_length: int) -> None:
        self._gen.rewind_to(new_length)


def _rstrip(row: list[int], pad: int) -> list[int]:
    end = len(row)
    while end > 1 and row[end - 1] == pad:
        end -= 1
    return row[:end]
