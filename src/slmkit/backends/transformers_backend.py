"""`transformers:./folder`: Hugging Face transformers runs the model (AutoModelForCausalLM, its own
weights loading and forward); our tokenizer, template and sampler (backends/runtime.py) do the rest.
Text models (phi3, phimoe, gemma3, ...); a folder whose model needs remote code is refused unless
trust_remote_code=True is passed."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BackendUnavailableError, InvalidRequestError, ModelFileError
from .runtime import RuntimeBackend, hf_folder_info

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersBackend(RuntimeBackend):
    provider = "transformers"
    has_full_logits = True

    def __init__(self, model: Any, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.model = model
        self._past: Any = None

    def reset(self) -> None:
        self._past = None

    @torch.inference_mode()
    def _run(self, ids: Sequence[int]) -> torch.Tensor:
        out = self.model(torch.tensor([list(ids)]), cache=self._past, use_cache=True)
        self._past = out.cache
        return out.logits[0, -1].float()

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        self.reset()
        return self._run(ids)

    def step(self, token: int) -> torch.Tensor:
        return self._run([token])

    @torch.inference_mode()
    def full_logits(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model(torch.tensor([list(ids)])).logits[0].float()


def open(provider: str, target: str, *, dtype: str = "auto", device: str = "cpu",  # noqa: A001 -- registry contract
         trust_remote_code: bool = False, **options: Any) -> TransformersBackend:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise BackendUnavailableError(provider, f"needs transformers ({e})", extra="transformers") from None
    if options:
        raise InvalidRequestError(f"unknown option {next(iter(options))!r} for the transformers backend",
                                  param=next(iter(options)))
    if dtype not in DTYPES:
        raise InvalidRequestError(f"must be one of {', '.join(DTYPES)}", param="dtype")
    folder = Path(target).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelFileError(folder, "is not a Hugging Face model folder (no config.json)")
    info, config, gen = hf_folder_info(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype] or "auto", device_map=device,
                                                     trust_remote_code=trust_remote_code).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(folder, f"transformers cannot load it ({type(e).__name__}: {e})") from None
    return TransformersBackend(model, info, name=folder.resolve().name, model_type=str(config.get("model_type")),
                               generation_config=gen, path=folder, format="transformers",
                               dtype=str(model.dtype).removeprefix("torch."))
