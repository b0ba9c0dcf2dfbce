"""``python -m fastalign ...`` is the ``fastalign`` command (see fastalign/cli.py)."""

from .cli import main

main()
