"""ssdlit's Hydra configs, installed as the package ``ssdlit.conf`` (``pkg://ssdlit.conf``).

The primary configs are ``train.yaml`` (the demo when run without arguments) and
``evaluate.yaml``; every other folder is a config group. Add your own folder of configs
with ``--config-dir DIR`` (or ``hydra.searchpath=[file://DIR]``) and select them as usual.
"""

from ssdlit.training.resolvers import register_resolvers

register_resolvers()
