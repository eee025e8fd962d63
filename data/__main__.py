"""`python -m data`: the same commands as `albert-data`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
