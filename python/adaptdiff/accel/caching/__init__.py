"""Caches and static schedules: reuse block outputs across steps.

- :mod:`.online`: whole-stack caches that decide at run time (first-block / Fn-Bn, TeaCache,
  MagCache, TaylorSeer).
- :mod:`.schedule`: static ``[step][block][component]`` schedules and their executor.
- :mod:`.producers`, :mod:`.ecad`, :mod:`.searches`: what writes those schedules (interval,
  A-SDM, BAC, ECAD's NSGA-II).
"""
