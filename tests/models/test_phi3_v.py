"""Phi-3-vision natively, against a reference assembled here from transformers' CLIPVisionModel and
Phi3ForCausalLM on the same weights, with the §4 glue (phi-family.md) written out independently:
hidden_states[-2] without CLS, the 2x2 merge, sub_GN row ends, glb_GN, the projection MLP, and the
image features written over each run of -k placeholders."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import slmkit
from slmkit.errors import InvalidRequestError, SlmkitError, UnsupportedInputError
from tests.helpers.tiny_models import make_phi3v_folder

TOWER = "model.vision_embed_tokens."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_phi3v_folder(tmp_path_factory.mktemp("phi3v"))


@pytest.fixture(scope="module")
def llm(folder):
    return slmkit.load(folder, dtype="float32")


@pytest.fixture(scope="module")
def reference(folder):
    """(CLIPVisionModel, Phi3ForCausalLM, projection, glb_GN, sub_GN) from the folder's weights."""
    import json

    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    tower = CLIPVisionModel(CLIPVisionConfig(**cfg["vision_config"])).eval()
    prefix = TOWER + "img_processor.vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    text_cfg = {k: v for k, v in cfg.items() if k not in ("vision_config", "img_processor", "embd_layer",
                                                          "model_type", "architectures")}
    lm = Phi3ForCausalLM(Phi3Config(**text_cfg)).eval()
    lm.load_state_dict({k: v for k, v in state.items() if not k.startswith(TOWER)}, strict=True)
    c4, h = 4 * cfg["vision_config"]["hidden_size"], cfg["hidden_size"]
    proj = torch.nn.Sequential(torch.nn.Linear(c4, h), torch.nn.GELU(), torch.nn.Linear(h, h))
    proj.load_state_dict({k[len(TOWER + "img_projection."):]: v for k, v in state.items()
                          if k.startswith(TOWER + "img_projection.")})
    return SimpleNamespace(tower=tower, lm=lm, proj=proj, glb=state[TOWER + "glb_GN"], sub=state[TOWER + "sub_GN"])


def ref_features(ref, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """§4 written out: the image's token embeddings [n_tokens, hidden]."""
    h_c, w_c = size[0] // 336, size[1] // 336
    with torch.no_grad():
        f = ref.tower(pixels[: 1 + h_c * w_c], output_hidden_states=True).hidden_states[-2][:, 1:]
        n, L, C = f.shape
        H = int(L ** 0.5)
        f = f.reshape(n, H, H, C).reshape(n, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(
            n, H // 2, H // 2, 4 * C)
        g = H // 2
        glb = torch.cat([f[:1], ref.sub.repeat(1, g, 1, 1)], dim=2).reshape(1, -1, 4 * C)
        sub = f[1:].reshape(1, h_c, w_c, g, g, 4 * C).permute(0, 1, 3, 2, 4, 5).reshape(1, h_c * g, w_c * g, 4 * C)
        sub = torch.cat([sub, ref.sub.repeat(1, h_c * g, 1, 1)], dim=2).reshape(1, -1, 4 * C)
        return ref.proj(torch.cat([sub, ref.glb, glb], dim=1))[0]


def ref_logits(ref, ids: list[int], images: list[tuple[torch.Tensor, tuple[int, int]]]) -> torch.Tensor:
    t = torch.tensor([ids])
    with torch.no_grad():
        emb = ref.lm.model.embed_tokens(t.clamp_min(0)).clone()
        i = 0
        while i < len(ids):  # each run of -k gets image k's features (a repeated tag: again)
            if ids[i] >= 0:
                i += 1
                continue
            k = -ids[i]
            feats = ref_features(ref, *images[k - 1])
            emb[0, i:i + feats.shape[0]] = feats
            i += feats.shape[0]
        return ref.lm(inputs_embeds=emb).logits[0].float()


def tokens_of(size: tuple[int, int]) -> int:
    h_c, w_c = size[0] // 336, size[1] // 336
    return (h_c * w_c + 1) * 144 + 1 + (h_c + 1) * 12


def make_inputs(ids_parts: list, images: list[tuple[torch.Tensor, tuple[int, int]]], crops: int = 4):
    ids: list[int] = []
    for part in ids_parts:
        ids += [part] * tokens_of(images[-part - 1][1]) if isinstance(part, int) and part < 0 else list(part)
    pixel_values = torch.zeros(len(images), crops + 1, 3, 336, 336)
    for i, (px, _) in enumerate(images):
        pixel_values[i, : px.shape[0]] = px
    return SimpleNamespace(input_ids=torch.tensor(ids), pixel_values=pixel_values,
                           image_sizes=torch.tensor([s for _, s in images]),
                           num_image_tokens=[tokens_of(s) for _, s in images]), ids


def image(seed: int, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 + (size[0] // 336) * (size[1] // 336), 3, 336, 336, generator=g), size


def test_clip_tower_matches_transformers(llm, reference):
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    ours = llm.engine.model.model.vision_embed_tokens.img_processor.vision_model(px)
    with torch.no_grad():
        theirs = reference.tower(px, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # only the layers up to the feature layer are built (3-layer tower, hidden_states[-2]: 2 layers)
    assert len(llm.engine.model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers) == 2


@pytest.mark.parametrize("case", ["one", "three", "same_twice"])
def test_logits_match_reference(llm, reference, case):
    a, b, c = image(1, (672, 672)), image(2, (336, 1008)), image(3, (672, 336))
    tok = llm.tokenizer
    bos, user, nl, end = [1], [tok.token_to_id("<|user|>")], [29, 13], [tok.token_to_id("<|end|>")]
    if case == "one":
        imgs, parts = [a], [bos, user, nl, -1, bos, nl, [10, 11, 12], end]
    elif case == "three":
        imgs, parts = [a, b, c], [bos, user, nl, -1, bos, nl, -2, bos, nl, -3, bos, [20, 21], end]
    else:
        imgs, parts = [a], [bos, user, -1, bos, nl, -1, bos, [30, 31], end]
    inputs, ids = make_inputs(parts, imgs)
    ours = llm.logits(inputs)
    theirs = ref_logits(reference, ids, imgs)
    assert ours.shape == theirs.shape == (len(ids), llm.engine.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_matches_reference(llm, reference):
    imgs = [image(4, (336, 672))]
    inputs, ids = make_inputs([[1, 7, 29, 13], -1, [1, 29, 13, 40, 41, 9]], imgs)
    out = llm.generate(inputs, max_new_tokens=8, temperature=0, ignore_eos=True)
    seq = list(ids)
    for _ in range(8):  # the reference: a full forward per token
        seq.append(int(ref_logits(reference, seq, imgs)[-1].argmax()))
    assert out.token_ids == seq[len(ids):]
    assert out.usage.prompt_tokens == len(ids)
    streamed = [t for c in llm.generate(inputs, max_new_tokens=8, temperature=0, ignore_eos=True, stream=True)
                for t in c.token_ids]
    assert streamed == out.token_ids


def test_session_reuses_the_image(llm):
    """A second question about the same image: the KV of the image is reused, the tower not re-run."""
    imgs = [image(5, (336, 336))]
    first, ids = make_inputs([[1, 7], -1, [1, 50, 51]], imgs)
    session = llm.backend.new_session()
    encoded = llm.engine.images.encoded
    r1 = llm.generate(first, max_new_tokens=3, temperature=0, session=session, ignore_eos=True)
    assert llm.engine.images.encoded == encoded + 1
    second, ids2 = make_inputs([[1, 7], -1, [1, 50, 51], r1.token_ids, [52, 53]], imgs)
    fresh = llm.generate(second, max_new_tokens=4, temperature=0, ignore_eos=True)  # no session: same ids
    r2 = llm.generate(second, max_new_tokens=4, temperature=0, session=session, ignore_eos=True)
    assert session.last_prefill == len(ids2) - len(ids) - len(r1.token_ids)  # the two new tokens
    assert llm.engine.images.encoded == encoded + 1  # neither call ran the tower again
    assert r2.token_ids == fresh.token_ids


def test_batched_serving_with_images(folder, reference):
    """Continuous batching: an image prompt prefills in chunks beside a text prompt; the same tokens."""
    llm = slmkit.load(folder, dtype="float32")
    imgs = [image(6, (336, 336))]
    inputs, ids = make_inputs([[1, 7], -1, [1, 60, 61]], imgs)
    alone = llm.generate(inputs, max_new_tokens=5, temperature=0, ignore_eos=True).token_ids
    llm.enable_batching(slots=2, context=1024)
    import threading

    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("text", llm.generate([1, 5, 6, 7], max_new_tokens=5)))
    t.start()
    batched = llm.generate(inputs, max_new_tokens=5, temperature=0, ignore_eos=True).token_ids
    t.join()
    llm.close()
    assert batched == alone


def test_bad_inputs(llm, folder):
    imgs = [image(7, (336, 336))]
    inputs, ids = make_inputs([[1], -1, [5]], imgs)
    bad = SimpleNamespace(**{**vars(inputs), "input_ids": torch.tensor([1] + [-2] * 300 + [5])})
    with pytest.raises(InvalidRequestError, match="image 2"):
        llm.logits(bad)
    short = SimpleNamespace(**{**vars(inputs), "input_ids": torch.tensor([1] + [-1] * 300 + [5])})
    with pytest.raises(InvalidRequestError, match="placeholder tokens"):
        llm.logits(short)
    with pytest.raises(UnsupportedInputError):
        llm.generate(inputs, num_beams=2)
    from tests.helpers.tiny_models import make_phi3_folder

    text = slmkit.load(make_phi3_folder(folder.parent / "text-only"), dtype="float32")
    with pytest.raises(UnsupportedInputError, match="text-only"):
        text.generate(inputs)
    with pytest.raises(SlmkitError):
        text.logits(inputs)


def test_int4_keeps_the_tower_float(folder):
    llm = slmkit.load(folder, dtype="float32", quant="int4")
    tower = llm.engine.model.model.vision_embed_tokens
    assert all(type(m) is torch.nn.Linear for m in tower.modules() if "Linear" in type(m).__name__)
    assert "Quant" in type(llm.engine.model.model.layers[0].self_attn.qkv_proj).__name__
    inputs, _ = make_inputs([[1, 7], -1, [1, 70]], [image(8, (336, 336))])
    out = llm.generate(inputs, max_new_tokens=3, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 3
