"""report.json, report.md and a self-contained report.html (figures embedded), composed from what OUT holds:
verify's measurements, the layer-wise diff and its channel statistics, a bisect result and a TensorRT plan's
layer precisions where those exist. Nothing is recalibrated or re-run here (`make report`). Schema: docs/REPORT.md.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import markdown
import numpy as np

from pipeline import plots
from pipeline.artifacts import atomic_folder, atomic_path, read_json, write_json
from pipeline.bisect import RESULT as BISECT
from pipeline.outliers import outlier_rows, worst_module
from pipeline.report_markdown import FIGURES, render_markdown

REPORT_VERSION = 1


def compose(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from pipeline.run import ENGINE, LAYERWISE, LAYERWISE_CHANNELS, VERIFICATION

    r = {"report_version": REPORT_VERSION, **read_json(out / VERIFICATION)}
    r["layerwise"] = read_json(out / LAYERWISE)
    channels = dict(np.load(out / LAYERWISE_CHANNELS))
    rows = outlier_rows(channels, [g["module"] for g in r["layerwise"]["gemms"]])
    r["outliers"] = {"modules": rows, "worst": worst_module(rows) if rows else None}
    r["bisect"] = read_json(out / BISECT) if (out / BISECT).is_file() else None  # from `report --bisect`
    r["tensorrt_layers"] = _plan_layers(out / ENGINE, r["layerwise"]) if (out / ENGINE).is_file() else None
    return r, channels


def _plan_layers(plan: Path, layerwise: dict) -> dict:
    from trt_builder.inspect import gemm_precisions

    return gemm_precisions(plan, [g["module"] for g in layerwise["gemms"]])


def figures(r: dict, channels: dict) -> dict[str, bytes]:
    found = {"error_by_layer.png": plots.error_by_layer(r["layerwise"])}
    rows = r["outliers"]["modules"]
    if rows:
        found["activation_outliers.png"] = plots.ratio_by_layer(rows, "activation", "Activation outliers per layer")
        found["weight_ranges.png"] = plots.ratio_by_layer(rows, "weight", "Weight ranges per layer")
        found["worst_channels.png"] = plots.channel_profile(r["outliers"]["worst"], channels)
    return found


def write_reports(out: Path) -> Path:
    """Write report.json, report.md (figures in report_figures/) and report.html; returns report.md's path."""
    r, channels = compose(out)
    images = figures(r, channels)
    with atomic_folder(out / FIGURES) as tmp:
        for name, data in images.items():
            (tmp / name).write_bytes(data)
    text = render_markdown(r, list(images))
    write_json(out / "report.json", r)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(text, images, r["model"]))
    return out / "report.md"


def render_html(text: str, images: dict[str, bytes], title: str) -> str:
    """The markdown as HTML with every figure inlined as a data URI: one file to attach or mail."""
    body = markdown.markdown(text, extensions=["tables"])
    for name, data in images.items():
        body = body.replace(f'src="{FIGURES}/{name}"', f'src="data:image/png;base64,{base64.b64encode(data).decode()}"')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>smoothtrt report: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
