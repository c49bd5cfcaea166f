"""`transformers:./folder`: Hugging Face transformers runs the model (AutoModelForCausalLM, its own
weights loading and forward); our tokenizer, template and sampler (backends/runtime.py) do the rest.
Text models (phi3, phimoe, gemma3, ...); a folder whose model needs its own code (config.json's
auto_map, e.g. Phi-3.5-vision's modeling_phi3_v.py) is refused unless trust_remote_code=True is passed.
Vision folders run their text through transformers; images are refused (UnsupportedByBackendError):
a remote-code processor (Phi-3.5-vision's needs torchvision, and its code targets older
transformers) cannot be run here offline. slmkit.load(folder) runs phi3_v images natively."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BackendUnavailableError, InvalidRequestError, ModelFileError, UnsupportedByBackendError
from .runtime import RuntimeBackend, hf_folder_info

VISION_WHY = ("images through the folder's own processor are not run by this backend; slmkit.load(folder) runs "
              "phi3_v images natively")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersBackend(RuntimeBackend):
    provider = "transformers"
    has_full_logits = True

    def __init__(self, model: Any, *args: Any, vision: bool = False, **kw: Any):
        super().__init__(*args, **kw)
        self.model = model
        self._past: Any = None
        self.capabilities = dataclasses.replace(self.capabilities, embeddings=True)
        if vision:  # chats go through process(), which refuses images by name (not "a text-only model")
            self.capabilities = dataclasses.replace(self.capabilities, images=True)

    def process(self, prompt: str, images: Sequence[Any], num_crops: int | None = None) -> Any:
        from ..vision.phi3v import MultimodalInputs

        if images or num_crops is not None:
            raise UnsupportedByBackendError("images" if images else "num_crops", self.provider, VISION_WHY)
        ids = self.tokenizer.encode(prompt)
        return MultimodalInputs(torch.tensor(ids, dtype=torch.long), None, None, [])

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

    @torch.inference_mode()
    def embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """The native engine's pooling (engine/embedding.py) over transformers' final-normed hidden
        states: the base model's last_hidden_state, right-padded rows under its causal mask."""
        from ..engine.embedding import embed_rows

        base = self.model.base_model  # Phi3Model / Gemma3TextModel: ends with the final norm
        config = self.model.config
        scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        longrope = isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su")
        split = getattr(config, "original_max_position_embeddings", None) if longrope else None
        device = next(self.model.parameters()).device

        def hidden(ids: torch.Tensor) -> torch.Tensor:
            return base(input_ids=ids, use_cache=False).last_hidden_state.float()

        return embed_rows(rows, hidden, split_at=split, device=device)


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
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if auto_map and not trust_remote_code:
        code = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))
        raise ModelFileError(folder, f"its model needs its own code ({code}, from config.json auto_map): pass "
                             "trust_remote_code=True to run that Python code")
    try:
        # no device_map: it needs `accelerate`, which the transformers extra does not bring
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype] or "auto",
                                                     trust_remote_code=trust_remote_code).eval()
        torch.nn.Module.to(model, torch.device(device))
    except (OSError, ValueError, KeyError, ImportError) as e:
        hint = " (the native engine runs it: slmkit.load(folder))" if not auto_map else ""
        raise ModelFileError(folder, f"transformers cannot load it ({type(e).__name__}: {e}){hint}") from None
    vision = any(k in config for k in ("vision_config", "img_processor", "vision_tower"))
    return TransformersBackend(model, info, name=folder.resolve().name, model_type=str(config.get("model_type")),
                               generation_config=gen, path=folder, format="transformers",
                               dtype=str(model.dtype).removeprefix("torch."), vision=vision)
