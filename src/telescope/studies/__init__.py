"""The experiments of the paper, one module per study, run with ``telescope study NAME``.

A study module defines a module-level :class:`~telescope.studies.base.Study` (see
``docs/studies-api.md`` and :mod:`telescope.studies.toy`, the template). Importing the module
here is all it takes to register it: :data:`REGISTRY` (name -> study) picks up the module-level
studies of every imported ``telescope.studies.*`` module; :func:`get_study` looks one up.
"""
# ruff: noqa: I001, F401  (the study imports below register studies; one line per module)

from telescope.studies.base import REGISTRY, Progress, Study, get_study, list_studies, register
from telescope.studies.config import config_from_dict, config_to_dict, make_config

# The study modules: add one import line per study.
from telescope.studies import toy
from telescope.studies import grokking
from telescope.studies import mode_connectivity
from telescope.studies import double_descent
from telescope.studies import approximation
from telescope.studies import trees_vs_nets
from telescope.studies import ntk_double_descent
from telescope.studies import grokking_transformer
from telescope.studies import entropy_collapse
from telescope.studies import rank_growth
from telescope.studies import slingshot
from telescope.studies import lazy_regime
from telescope.studies import ntk_width
from telescope.studies import bottleneck
from telescope.studies import autoencoder_rank
from telescope.studies import hypernetwork_ntk
from telescope.studies import collegial_ensembles
from telescope.studies import neural_fisher_kernel

__all__ = ["REGISTRY", "Study", "Progress", "get_study", "list_studies", "make_config",
           "register", "config_from_dict", "config_to_dict"]
