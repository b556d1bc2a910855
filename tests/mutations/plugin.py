"""pytest plugin for the mutation harness: ``python -m pytest -p tests.mutations.plugin ...``
with ``ADAPTDIFF_MUTATION=<name>`` applies that breakage (:mod:`tests.mutations.breakages`) in
memory when pytest loads the plugin, before any conftest or test module is imported."""

import os

from tests.mutations import breakages

NAME = os.environ.get(breakages.ENV)
if NAME:
    breakages.apply(NAME)


def pytest_report_header(config):
    return f"adaptdiff mutation: {NAME or '(none)'} applied"
