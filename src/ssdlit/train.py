"""``python -m ssdlit.train``: the app :mod:`ssdlit.apps.train` (this file only makes the command run it)."""

from ssdlit.apps.train import main

if __name__ == "__main__":
    main()
