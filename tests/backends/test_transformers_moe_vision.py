"""transformers:./folder beyond dense text models: a tiny Phi-3.5-MoE (PhimoeForCausalLM) gives
transformers' own greedy tokens; a phi3_v folder needs trust_remote_code when its config names its own
code (auto_map), runs its text then, and refuses images by name."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import slmkit
from slmkit.errors import ModelFileError, UnsupportedByBackendError
from tests.helpers.tiny_models import make_phi3v_folder, make_phimoe_folder

pytest.importorskip("transformers")


def test_moe_greedy_equals_transformers_generate(tmp_path):
    from transformers import PhimoeForCausalLM

    folder = make_phimoe_folder(tmp_path / "moe")
    llm = slmkit.load(f"transformers:{folder}", dtype="float32")
    assert llm.backend.model_type == "phimoe"
    prompt = [1, 5, 9, 20, 33]
    got = llm.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    ref = PhimoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # min_new_tokens = max: no end-of-sequence, as ignore_eos
        want = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32)
    assert got == want[0, len(prompt):].tolist()
    assert len(set(got)) > 3  # a varied answer, so routing mistakes would show
    # every option still runs through our sampler over its logits
    a = llm.generate(prompt, max_new_tokens=8, temperature=0.7, top_k=10, seed=5)
    assert a.token_ids == llm.generate(prompt, max_new_tokens=8, temperature=0.7, top_k=10, seed=5).token_ids


# A folder's own code, as Phi-3.5-vision ships modeling_phi3_v.py: here a Phi-3 text model under the
# phi3_v model type (transformers has none), which ignores the vision weights.
CONFIG_CODE = """
from transformers import Phi3Config


class TinyVConfig(Phi3Config):
    model_type = "phi3_v"
"""
MODEL_CODE = """
from transformers import Phi3ForCausalLM

from .configuration_tiny_v import TinyVConfig


class TinyVForCausalLM(Phi3ForCausalLM):
    config_class = TinyVConfig
"""


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    folder = make_phi3v_folder(tmp_path_factory.mktemp("v") / "tiny-v")
    (folder / "configuration_tiny_v.py").write_text(textwrap.dedent(CONFIG_CODE))
    (folder / "modeling_tiny_v.py").write_text(textwrap.dedent(MODEL_CODE))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny_v.TinyVConfig",
                       "AutoModelForCausalLM": "modeling_tiny_v.TinyVForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_remote_code_needs_trust_and_images_are_refused(vision_folder, tmp_path):
    with pytest.raises(ModelFileError, match="trust_remote_code=True"):
        slmkit.load(f"transformers:{vision_folder}")
    llm = slmkit.load(f"transformers:{vision_folder}", dtype="float32", trust_remote_code=True)
    native = slmkit.load(vision_folder, dtype="float32")
    prompt = [1, 5, 9, 20, 33]
    assert llm.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids == \
        native.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids
    msgs = [{"role": "user", "content": "Describe it"}]
    assert llm.chat(msgs, max_new_tokens=4, temperature=0).finish_reason in ("stop", "length")
    from PIL import Image

    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "x.png")
    image_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}},
                                               {"type": "text", "text": "Describe it"}]}]
    with pytest.raises(UnsupportedByBackendError) as e:
        llm.chat(image_msgs, max_new_tokens=4)
    assert e.value.param == "images" and "transformers" in str(e.value) and "slmkit.load" in str(e.value)


def test_unknown_architecture_without_code_names_the_native_engine(tmp_path):
    folder = make_phi3v_folder(tmp_path / "plain-v")  # phi3_v without auto_map: transformers has no such model
    with pytest.raises(ModelFileError, match="native engine"):
        slmkit.load(f"transformers:{folder}")
