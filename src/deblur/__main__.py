"""``python -m deblur``: the ``deblur`` command (deblur.cli.main)."""

from deblur.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
