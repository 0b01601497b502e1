"""A Hub model folder that also runs as a Hugging Face Space: an `app.py` serving `cct demo`'s page for the model
in the folder, the `requirements.txt` that installs it, and the Space settings in the model card's front matter.
Push the folder to a Space repository (`cct push` pushes model repositories) and it runs as it is."""

from __future__ import annotations

from pathlib import Path

SPACE_APP = '''"""The demo page of the model in this folder (written by `cct export --format hub`)."""

from pathlib import Path

from cct.demo import serve

serve(Path(__file__).parent)
'''
SPACE_REQUIREMENTS = "compact-transformers[demo]\n"
# the Space settings: a Gradio app in app.py on the Python the package supports
SPACE_FRONT_MATTER = 'sdk: gradio\napp_file: app.py\npython_version: "3.11"\n'


def write_space_files(folder: str | Path) -> None:
    """Add `app.py` and `requirements.txt` to a Hub model folder and the Space settings to its `README.md`.

    Args:
        folder: a folder holding a model card `README.md` (with or without YAML front matter).
    """
    folder = Path(folder)
    (folder / "app.py").write_text(SPACE_APP)
    (folder / "requirements.txt").write_text(SPACE_REQUIREMENTS)
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    if text.startswith("---\n"):
        card.write_text("---\n" + SPACE_FRONT_MATTER + text[len("---\n"):])
    else:
        card.write_text("---\n" + SPACE_FRONT_MATTER + "---\n" + text)
