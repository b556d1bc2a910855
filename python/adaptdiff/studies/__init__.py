"""Paper reproductions at small scale, one module per study (see docs/studies.md)."""
