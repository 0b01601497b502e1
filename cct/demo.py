"""A web page to try a trained model (Gradio): a visitor uploads an image, or picks an example, and sees the top-5
classes with their probabilities and where the model looked (the maps of `cct.models.explain`).

`cct demo` serves it from this machine; a Hub model folder written by `cct export --format hub` carries an `app.py`
that serves the same page as a Hugging Face Space (see `cct.models.space`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .data.augment import normalize
from .data.datasets import BadImage, decode_image_file, eval_transform
from .errors import CCTError
from .models.explain import POOLING_TITLES, explain, overlay
from .train.runs import load_trained

EXAMPLES = Path(__file__).parent / "demo_examples"  # a few CIFAR-10 test images, for models trained on CIFAR-10
INSTALL_HINT = "the demo needs Gradio: pip install 'compact-transformers[demo]'"


def _gradio() -> Any:
    """The gradio module, or a one-line CCTError saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise CCTError(INSTALL_HINT) from None
    return gradio


def build_demo(source: str | os.PathLike, model_name: str | None = None) -> Any:
    """The Gradio app of a trained model.

    Args:
        source: a weights file, run directory or Hub folder (anything `cct predict` accepts).
        model_name: architecture name, for weights files that do not record it.

    Returns:
        A `gradio.Blocks` app; serve it with its `launch()`.
    """
    gr = _gradio()
    model, meta = load_trained(source, model_name)
    transform = eval_transform(model.img_size[0], crop_pct=1.0)
    kind = "seq_pool" if model.cls_token is None else "class_token"

    def look(path: str | None):
        if path is None:
            return None, None, None
        try:
            image = transform(decode_image_file(path))
        except BadImage as e:
            raise gr.Error(f"cannot read this image: {e}") from None
        result = explain(model, normalize(image[None], meta["mean"], meta["std"]), topk=5)
        top = zip(result.top_classes[0].tolist(), result.top_probs[0].tolist(), strict=True)
        return ({meta["classes"][c]: p for c, p in top}, overlay(image, result.pooling[0]),
                overlay(image, result.rollout[0]))

    dataset = meta.get("dataset") or "its data"
    with gr.Blocks(title=f"{meta['model']} - cct", analytics_enabled=False) as app:
        gr.Markdown(f"# {meta['model']} trained on {dataset}\nUpload an image: the model's top-5 classes, and "
                    f"where it looked ({POOLING_TITLES[kind]}, and attention rollout through all its blocks).")
        with gr.Row():
            image = gr.Image(type="filepath", label="image", elem_id="image", height=320)
            label = gr.Label(num_top_classes=5, label="top-5", elem_id="top5")
        with gr.Row():
            pooling = gr.Image(label=POOLING_TITLES[kind], elem_id="pooling", interactive=False, height=320)
            rollout = gr.Image(label="attention rollout", elem_id="rollout", interactive=False, height=320)
        if meta.get("dataset") == "cifar10":
            gr.Examples(sorted(str(p) for p in EXAMPLES.glob("*.png")), inputs=image)
        image.change(look, inputs=image, outputs=[label, pooling, rollout])
    return app


def serve(source: str | os.PathLike, model_name: str | None = None, host: str | None = None,
          port: int | None = None, share: bool = False) -> None:
    """Serve the demo of a trained model until interrupted.

    Args:
        source: a weights file, run directory or Hub folder.
        model_name: architecture name, for weights files that do not record it.
        host: the address to listen on (`0.0.0.0` for every interface); default `GRADIO_SERVER_NAME`, else
            127.0.0.1 (a Space sets the variable).
        port: the TCP port; default `GRADIO_SERVER_PORT`, else the first free one from 7860.
        share: also open a temporary public link through Gradio's share servers.
    """
    app = build_demo(source, model_name)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's requests to its own page, one line each
    try:
        app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(EXAMPLES)])
    except OSError as e:
        raise CCTError(f"cannot serve the demo: {str(e).splitlines()[0][:200]}") from None
