"""``python -m wsss``: the ``wsss`` command (:mod:`wsss.cli`)."""

from .cli import main

raise SystemExit(main())
