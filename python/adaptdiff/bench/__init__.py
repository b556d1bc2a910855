"""The benchmark suite, shipped with the package: ``adaptdiff bench`` (:mod:`.cli`).

:mod:`.kernels`: every op's kernel against its pure-torch reference, one module per op family.
End-to-end benchmarks, one module each: :mod:`.sampling`, :mod:`.block_decode`, :mod:`.mode`,
:mod:`.moe_layer`, :mod:`.adapters` and :mod:`.accel` (a subpackage). They share
:mod:`.harness` (cases, timing), :mod:`.arguments` (the common options) and :mod:`.output`
(environment, tables, JSON lines). Recorded results and how to read them:
``docs/benchmarks.md``.

Layering: this package may import anything of adaptdiff; only ``adaptdiff.cli`` imports it.
"""

from .cli import BENCHMARKS, build_parser, main
from .kernels import FAMILIES, OPS, run

__all__ = ["BENCHMARKS", "FAMILIES", "OPS", "build_parser", "main", "run"]
