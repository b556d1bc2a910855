"""Paper reproductions at small scale, one module per study, run by one runner
(``adaptdiff study NAME [--quick] [--seeds N] [--out DIR]``; docs/studies.md).

A study module defines a :class:`~.runner.Study` named ``STUDY`` and is listed in
:data:`STUDIES`; :func:`get_study` imports it when asked for, so listing the studies stays cheap.
"""

from __future__ import annotations

import importlib

from .runner import Column, Progress, Stat, Study, run_study

# name -> module defining STUDY
STUDIES: dict[str, str] = {
    "adapt": "adaptdiff.studies.adapt",
    "control": "adaptdiff.studies.control",
    "divcontrol": "adaptdiff.studies.divcontrol",
    "dimsum": "adaptdiff.studies.dimsum",
    "dfm": "adaptdiff.studies.dfm",
    "afa": "adaptdiff.studies.afa",
    "diffscaler": "adaptdiff.studies.diffscaler",
    "diffusia": "adaptdiff.studies.diffusia",
    "hf-convert": "adaptdiff.studies.hf_convert",
    "motion": "adaptdiff.studies.motion",
    "multiconcept": "adaptdiff.studies.multiconcept",
    "nag": "adaptdiff.studies.nag",
    "prune": "adaptdiff.studies.prune",
    "vl": "adaptdiff.studies.vl",
    "tracerl": "adaptdiff.studies.tracerl",
    "policy": "adaptdiff.studies.policy",
    "timeseries": "adaptdiff.studies.timeseries",
    "mdt": "adaptdiff.studies.mdt",
    "sr": "adaptdiff.studies.sr",
    "ldm": "adaptdiff.studies.ldm",
    "edge": "adaptdiff.studies.edge",
    "ita": "adaptdiff.studies.ita",
}

__all__ = ["STUDIES", "Column", "Progress", "Stat", "Study", "get_study", "run_study"]


def get_study(name: str) -> Study:
    """The study ``name``; a ValueError names the studies there are."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(sorted(STUDIES))}")
    study = importlib.import_module(STUDIES[name]).STUDY
    if study.name != name:
        raise RuntimeError(f"{STUDIES[name]}.STUDY is named {study.name!r}, registered as {name!r}")
    return study
