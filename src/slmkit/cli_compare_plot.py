"""`slm compare --plot OUT.png`: a bar chart of each model's mean TTFT, decode tokens/s and peak
memory, drawn with Pillow (a dependency already, so no plotting library is needed): three panels of
horizontal bars, one colour per model."""
from __future__ import annotations

from pathlib import Path

from .errors import InvalidRequestError

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANELS = [("time to first token (s), lower is better", "ttft", "{:.3f} s"),
          ("decode tokens/s, higher is better", "rate", "{:.1f}"),
          ("peak memory (GiB), lower is better", "rss", "{:.2f} GiB")]
WIDTH, LABEL_W, ROW_H, TITLE_H, PAD = 1000, 330, 26, 30, 16


def check_writable(path: str) -> None:
    """Before any model runs: the chart can be written there."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise InvalidRequestError(f"must name a .png file, got {path!r}", param="--plot")
    if not p.parent.resolve().is_dir():
        raise InvalidRequestError(f"folder {str(p.parent)!r} does not exist", param="--plot")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def model_values(m: dict) -> dict[str, float | None]:
    ok = [r for r in m.get("results", []) if not r.get("error")]
    rss = m.get("peak_rss_bytes")
    return {"ttft": _mean([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]),
            "rate": _mean([r["tokens_per_s"] for r in ok if r.get("tokens_per_s") is not None]),
            "rss": None if m.get("error") or rss is None else rss / 2**30}


def plot(report: dict, path: str) -> None:
    from PIL import Image, ImageDraw

    models = report["models"]
    values = [model_values(m) for m in models]
    panel_h = TITLE_H + ROW_H * len(models) + PAD
    img = Image.new("RGB", (WIDTH, PAD + panel_h * len(PANELS)), "white")
    draw = ImageDraw.Draw(img)
    top = PAD
    bar_max = WIDTH - LABEL_W - 110  # room for the value after the bar
    for title, key, fmt in PANELS:
        draw.text((PAD, top + 6), title, fill="black")
        top += TITLE_H
        biggest = max([x for x in (v[key] for v in values) if x is not None], default=0.0) or 1.0
        for i, (m, v) in enumerate(zip(models, values)):
            y = top + i * ROW_H
            name = m["model"] if len(m["model"]) <= 48 else "..." + m["model"][-45:]
            draw.text((PAD, y + 6), name, fill="black")
            value = v[key]
            if value is None:
                draw.text((LABEL_W, y + 6), "-" if not m.get("error") else "error", fill=(120, 120, 120))
                continue
            length = max(1, round(bar_max * value / biggest))
            draw.rectangle((LABEL_W, y + 3, LABEL_W + length, y + ROW_H - 5), fill=COLOURS[i % len(COLOURS)])
            draw.text((LABEL_W + length + 6, y + 6), fmt.format(value), fill="black")
        top += ROW_H * len(models) + PAD
        draw.line((PAD, top - PAD // 2, WIDTH - PAD, top - PAD // 2), fill=(220, 220, 220))
    try:
        img.save(path, format="PNG")
    except OSError as e:
        raise InvalidRequestError(f"cannot write {path!r} ({e.strerror or e})", param="--plot") from None
