"""``python -m datagen``: see :mod:`datagen.cli`."""

from datagen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
