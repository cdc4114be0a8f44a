"""``python -m ctxengine``."""

from .cli import main

main()
