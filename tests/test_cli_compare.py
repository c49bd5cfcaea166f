"""slm compare: tiny models (native and transformers: strings) through the CLI, each in its own
process; the JSON report's shape and numbers, the table, the PNG chart, --suite small, prices, and
one clear error line for a bad model string."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image

import slmkit
from slmkit.cli import main
from slmkit.cli_compare import SUITES, compare, price, render_table
from slmkit.cli_compare_plot import COLOURS
from tests.helpers.tiny_models import make_phi3_folder

PROMPT = "Tell me a story about the sea"


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # a 4096-token context: the suite's long document fits
    return make_phi3_folder(tmp_path_factory.mktemp("cmp"), "gqa", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def two_models(folder, tmp_path_factory):
    png = tmp_path_factory.mktemp("plot") / "chart.png"
    rc, out, err = run_cli(["compare", str(folder), f"transformers:{folder}", "-p", PROMPT, "--max-tokens", "12",
                            "--dtype", "float32", "--json", "--plot", str(png), "--warmup"])
    return rc, json.loads(out), err, png


def test_json_report_of_two_runtimes(two_models, folder):
    rc, report, err, _ = two_models
    assert rc == 0, err
    assert [p["name"] for p in report["prompts"]] == ["prompt"] and report["prompts"][0]["text"] == PROMPT
    native, tf = report["models"]
    assert (native["model"], tf["model"]) == (str(folder), f"transformers:{folder}")
    assert (native["backend"], tf["backend"]) == ("native", "transformers")
    want = slmkit.load(folder, dtype="float32").chat([{"role": "user", "content": PROMPT}], max_new_tokens=12,
                                                     temperature=0)
    for m in (native, tf):
        assert m["error"] is None and m["cost_per_1m"] is None and m["cost_note"] == "local"
        # the process's peak, torch and the model included: at least what it was before the load
        assert m["load_s"] > 0 and m["peak_rss_bytes"] >= m["rss_before_load_bytes"] > 50 * 2**20
        assert report["warmup"] is True and m["warmup_s"] > 0
        (r,) = m["results"]
        assert r["answer"] == want.text and r["completion_tokens"] == want.usage.completion_tokens
        assert r["prompt_tokens"] == want.usage.prompt_tokens and r["finish_reason"] == want.finish_reason
        assert 0 < r["ttft_s"] <= r["total_s"] and r["tokens_per_s"] > 0 and r["cost_usd"] is None


def test_table_and_png(two_models, folder):
    _, report, _, png = two_models
    table = render_table(report)
    assert f"-- {folder}:" in table and f"-- transformers:{folder}:" in table
    assert report["models"][0]["results"][0]["answer"].strip() in table
    header = next(line for line in table.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "load", "s", "TTFT", "s", "tok/s", "peak", "RSS", "$", "per", "1M", "tokens"]
    rows = [line for line in table.splitlines() if line.startswith((str(folder), "transformers:"))]
    assert len(rows) == 2 and all("GiB" in row and row.rstrip().endswith("-") for row in rows)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width == 1000 and img.height > 200
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert COLOURS[0] in colours and COLOURS[1] in colours and COLOURS[2] not in colours  # a bar per model


def test_suite_small(folder):
    rc, out, err = run_cli(["compare", str(folder), "--suite", "small", "--max-tokens", "4", "--json"])
    assert rc == 0, err
    report = json.loads(out)
    names = [name for name, _ in SUITES["small"]]
    assert [p["name"] for p in report["prompts"]] == names
    results = report["models"][0]["results"]
    assert [r["prompt"] for r in results] == names and all(r["error"] is None for r in results)
    long = results[names.index("long-document")]
    assert long["prompt_tokens"] > 800 and long["prompt_tokens"] > 4 * results[0]["prompt_tokens"]
    assert all(r["completion_tokens"] == 4 for r in results)  # none of its answers ends sooner


def test_bad_model_string_is_one_error_line(tmp_path):
    missing = tmp_path / "no-such-model"
    rc, out, err = run_cli(["compare", str(missing), "-p", "hi", "--max-tokens", "2"])
    assert rc == 1 and "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {missing}: ") and str(missing) in lines[0][7 + len(
        str(missing)):]


def test_bad_plot_path_before_any_model_runs(tmp_path):
    rc, out, err = run_cli(["compare", "builtin", "-p", "hi", "--plot", str(tmp_path / "nope" / "c.png")])
    assert rc == 1 and out == "" and err.startswith("error: --plot: folder") and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["compare", "builtin", "-p", "hi", "--plot", str(tmp_path / "c.jpg")])
    assert rc == 1 and ".png" in err


def test_prices_and_costs(monkeypatch):
    assert price("azure:Phi-3.5-mini-instruct") == ((0.13, 0.52), "Azure serverless list price")
    assert price("github:microsoft/Phi-3.5-mini-instruct")[0] == (0.0, 0.0)
    assert price("nim:microsoft/phi-3.5-mini-instruct")[0] is None and price("./folder") == (None, "local")
    fake = {"model": "azure:Phi-3.5-MoE-instruct", "error": None,
            "results": [{"prompt": "prompt", "prompt_tokens": 1000, "completion_tokens": 500, "error": None}]}
    monkeypatch.setattr("slmkit.cli_compare.run_model", lambda job, timeout: json.loads(json.dumps(fake)))
    report = compare(["azure:Phi-3.5-MoE-instruct"], [{"name": "prompt", "text": "x", "images": []}], options={},
                     load={})
    (m,) = report["models"]
    assert m["cost_per_1m"] == {"input": 0.16, "output": 0.64}
    assert m["results"][0]["cost_usd"] == pytest.approx((1000 * 0.16 + 500 * 0.64) / 1e6)


def test_image_goes_with_the_prompt(tmp_path):
    from tests.helpers.tiny_models import make_phi3v_folder

    vision = make_phi3v_folder(tmp_path / "v")
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    rc, out, err = run_cli(["compare", str(vision), "-p", "Describe it", "--image", str(image), "--max-tokens", "6",
                            "--dtype", "float32", "--json"])
    assert rc == 0, err
    (r,) = json.loads(out)["models"][0]["results"]
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                         {"type": "text", "text": "Describe it"}]}]
    want = slmkit.load(vision, dtype="float32").chat(msgs, max_new_tokens=6, temperature=0)
    assert r["answer"] == want.text and r["prompt_tokens"] == want.usage.prompt_tokens > 100  # the image's tokens
    rc, _, err = run_cli(["compare", str(vision), "-p", "x", "--image", str(tmp_path / "missing.png")])
    assert rc == 1 and "missing.png" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["compare", str(vision), "--suite", "small", "--image", str(image)])
    assert rc == 1 and "--image" in err
