"""ssdlit's Hydra configs, installed as the package ``ssdlit.conf`` (``pkg://ssdlit.conf``).

The primary configs are those of the five apps: ``train.yaml`` (the demo when run without
arguments), ``evaluate.yaml``, ``predict.yaml``, ``export.yaml`` and ``inspect.yaml``;
every folder is a config group. Importing the package registers the resolver the configs
use (:mod:`ssdlit.config`). Add your own folder of configs with ``--config-dir DIR`` (or
``hydra.searchpath=[file://DIR]``) and select them as usual.
"""

from ssdlit.config import register_resolvers

register_resolvers()
