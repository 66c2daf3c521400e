"""``python -m allspark_seg`` (and ``torchrun --nproc_per_node=N -m allspark_seg train ...``)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
