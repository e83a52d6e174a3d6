"""Prompt templates: every prompt the generator sees is a Jinja file under prompts/."""

from __future__ import annotations

import hashlib
from functools import cache

import jinja2

from pipeline.taxonomy import PROMPTS_DIR

# Gemma's turn format, for models that ship no chat template (the embedded base model): the
# generator backends and the trainer render prompts with this one file.
CHAT_FALLBACK = "chat/gemma.jinja"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROMPTS_DIR),
    undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
    keep_trailing_newline=True,
    autoescape=False,
)


def render_prompt(name: str, **variables: object) -> str:
    """Render prompts/<name> with `variables`."""
    try:
        return _ENV.get_template(name).render(**variables)
    except jinja2.TemplateNotFound:
        raise FileNotFoundError(
            f"prompt template prompts/{name} does not exist; check the template name in the config"
        ) from None


@cache
def template_hash(name: str) -> str:
    """Short content hash of a template file, stored with each row it produced."""
    return hashlib.sha256((PROMPTS_DIR / name).read_bytes()).hexdigest()[:12]
