"""``python -m ssdlit.predict``: the app :mod:`ssdlit.apps.predict` (this file only makes the command run it)."""

from ssdlit.apps.predict import main

if __name__ == "__main__":
    main()
