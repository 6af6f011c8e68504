"""``python -m maas …``: the same click program as the ``maas`` console script (:func:`maas.cli.main`):
``serve`` (``serve run`` that stops cleanly), ``plan``, ``manifest`` and the client commands."""

from maas.cli import main

if __name__ == "__main__":
    main()
