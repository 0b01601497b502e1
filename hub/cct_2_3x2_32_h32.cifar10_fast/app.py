"""The demo page of the model in this folder (written by `cct export --format hub`)."""

from pathlib import Path

from cct.demo import serve

serve(Path(__file__).parent)
