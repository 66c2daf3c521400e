"""Run by ``torchrun`` in test_distributed.py: train a tiny config and save this rank's final model state.

Usage: ``ddp_script.py OUT DATA_ROOT BATCH [override ...]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from allspark_seg.dist import destroy, init_distributed  # noqa: E402
from allspark_seg.engine.train import Trainer  # noqa: E402
from train_utils import tiny_config  # noqa: E402


def main() -> None:
    out, root, batch, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    cfg = tiny_config(root, overrides=tuple(overrides), iterations=4, batch_size=int(batch))
    trainer = Trainer(cfg, Path(out), env, None)
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(out) / f"rank{env.rank}.pt")
    destroy()


if __name__ == "__main__":
    main()
