"""``python -m ssdlit.export``: the app :mod:`ssdlit.apps.export` (this file only makes the command run it)."""

from ssdlit.apps.export import main

if __name__ == "__main__":
    main()
