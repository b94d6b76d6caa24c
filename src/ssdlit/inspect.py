"""``python -m ssdlit.inspect``: the app :mod:`ssdlit.apps.inspect` (this file only makes the command run it)."""

from ssdlit.apps.inspect import main

if __name__ == "__main__":
    main()
