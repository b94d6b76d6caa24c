"""``python -m ssdlit.evaluate``: the app :mod:`ssdlit.apps.evaluate` (this file only makes the command run it)."""

from ssdlit.apps.evaluate import main

if __name__ == "__main__":
    main()
