"""The official openai and ollama clients against `slm serve` on a tiny Phi-3-vision folder: image
parts (data: URLs) streamed and not, num_crops, Ollama's `images` (a file path and bytes) in chat and
generate, each answer the Python API's for the same conversation; and the refusals (too many
images, a bad image, a text-only model, a bad num_crops) as typed errors with their status and param."""
from __future__ import annotations

import base64
import io

import pytest

import slmkit
from tests.helpers.serving import slm_serve

pytest.importorskip("fastapi")
PIL = pytest.importorskip("PIL")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")

QUESTION = "What is in this picture?"


def png(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.new("RGB", (w, h), color)
    im.putpixel((0, 0), (0, 0, 0))
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode()


def image_part(b: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(b)}}


def asking(*images: bytes, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(b) for b in images), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.helpers.tiny_models import make_phi3_folder, make_phi3v_folder

    root = tmp_path_factory.mktemp("vis")
    return make_phi3v_folder(root / "eyes"), make_phi3_folder(root / "text", "gqa", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def base(folders):
    eyes, text = folders
    with slm_serve({"eyes": eyes, "text": text}, "--dtype", "float32", "--api-key", "k") as url:
        yield url


@pytest.fixture(scope="module")
def llm(folders):
    return slmkit.load(folders[0], dtype="float32")


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def oll(base):
    return ollama.Client(host=base, headers={"Authorization": "Bearer k"})


def test_openai_client_image_part_streamed_and_not(client, llm):
    msgs = asking(png(40, 30))
    want = llm.chat(msgs, max_new_tokens=8, temperature=0)
    r = client.chat.completions.create(model="eyes", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.usage.prompt_tokens
    tags = llm.processor("<|image_1|>", images=[png(40, 30)]).num_image_tokens[0]
    assert r.usage.prompt_tokens > tags  # the image's tokens are in the prompt
    chunks = list(client.chat.completions.create(model="eyes", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens


def test_num_crops_reaches_the_model(client, llm):
    wide = asking(png(1000, 120))  # a wide image: its HD crop grid depends on num_crops
    counts = {}
    for n in (1, 16):
        r = client.chat.completions.create(model="eyes", messages=wide, max_tokens=1, temperature=0,
                                           extra_body={"num_crops": n})
        counts[n] = r.usage.prompt_tokens
        assert counts[n] == llm.chat(wide, max_new_tokens=1, temperature=0, num_crops=n).usage.prompt_tokens
    assert counts[16] > counts[1]


def test_ollama_client_images_as_a_path_and_bytes(oll, llm, tmp_path):
    red, green = png(40, 30), png(20, 50, (20, 200, 20))
    path = tmp_path / "red.png"
    path.write_bytes(red)
    opts = {"temperature": 0, "num_predict": 8}
    want = llm.chat(asking(red, green), max_new_tokens=8, temperature=0)
    r = oll.chat(model="eyes", messages=[{"role": "user", "content": QUESTION, "images": [str(path), green]}],
                 options=opts)
    assert r.message.content == want.text and r.prompt_eval_count == want.usage.prompt_tokens
    parts = list(oll.chat(model="eyes", messages=[{"role": "user", "content": QUESTION, "images": [path, green]}],
                          options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == want.text
    g = oll.generate(model="eyes", prompt=QUESTION, images=[red], options=opts)
    assert g.response == llm.chat(asking(red), max_new_tokens=8, temperature=0).text
    assert "vision" in oll.show("eyes").capabilities and "vision" not in oll.show("text").capabilities


def test_v1_models_names_the_capabilities(base):
    r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"})
    assert {m["id"]: m["capabilities"] for m in r.json()["data"]} == {
        "eyes": ["completion", "tools", "vision"], "text": ["completion", "tools"]}


def bad_request(call, param: str, words: str):
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert words in e.value.body["message"]


def test_openai_refusals_are_typed_and_named(client):
    create = client.chat.completions.create
    one = png(8, 6)
    bad_request(lambda: create(model="eyes", messages=asking(*[one] * 17), max_tokens=1),
                "messages[0].content[16].image_url", "at most 16 images")
    bad_request(lambda: create(model="eyes", messages=asking(one, b"not an image"), max_tokens=1),
                "messages[0].content[1].image_url", "not a readable image")
    bad_request(lambda: create(model="eyes", messages=asking(one[:30]), max_tokens=1),
                "messages[0].content[0].image_url", "not a readable image")
    bad_request(lambda: create(model="text", messages=asking(one), max_tokens=1), "messages", "text-only")
    for value in (0, 65, "4", 2.5, True):
        bad_request(lambda v=value: create(model="eyes", messages=asking(one), max_tokens=1,
                                           extra_body={"num_crops": v}), "num_crops", "must be an integer in [1, 64]")
    bad_request(lambda: create(model="text", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                               extra_body={"num_crops": 4}), "num_crops", "text-only")
    with pytest.raises(openai.BadRequestError):  # streamed: refused before the stream starts
        create(model="eyes", messages=asking(b"junk"), max_tokens=1, stream=True)


def test_ollama_refusals_name_the_image(oll, base):
    good = png(8, 6)
    cases = [
        (lambda: oll.chat(model="eyes", messages=[{"role": "user", "content": "hi"},
                                                   {"role": "user", "content": "and", "images": [good, b"junk"]}]),
         "messages[1].images[1]", "not a readable image"),
        (lambda: oll.generate(model="eyes", prompt="hi", images=[b"junk"]), "images[0]", "not a readable image"),
        (lambda: oll.generate(model="eyes", prompt="hi", images=[good] * 17), "images[16]", "at most 16 images"),
        (lambda: oll.chat(model="text", messages=[{"role": "user", "content": "hi", "images": [good]}]),
         "messages[0].images", "text-only"),
        (lambda: oll.generate(model="text", prompt="hi", images=[good]), "images", "text-only"),
    ]
    for call, param, words in cases:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 400 and e.value.error["param"] == param, e.value.error
        assert words in e.value.error["message"]
    r = httpx.post(base + "/api/chat", headers={"Authorization": "Bearer k"}, json={
        "model": "eyes", "stream": False, "messages": [{"role": "user", "content": "hi", "images": ["@@@"]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].images[0]"
    assert "not valid base64" in r.json()["error"]["message"]
    assert httpx.get(base + "/health").status_code == 200  # and the server keeps serving
