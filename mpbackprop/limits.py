"""Bounds of the values mpbackprop accepts, in one module that imports nothing.

The command line's option types (:mod:`mpbackprop.cli`), the meta-training config
(:mod:`mpbackprop.metatrain.config`), the learned rules' constructors
(:mod:`mpbackprop.rules.learned`) and the rule files' checks (:mod:`mpbackprop.rules.io`) all
read their bounds from here, so they cannot drift apart.
"""

from __future__ import annotations

__all__ = ["MAX_SEED", "MAX_META_SEED", "MAX_THREADS", "SIZE_LIMITS"]

#: Largest global seed (``mpbackprop --seed``; a rule file's ``seed``): what ``torch.manual_seed``
#: and the seeded task and feedback streams accept, with room for the offsets added to it.
MAX_SEED = 2**63 - 1

#: Largest meta-training seed (``meta-train --seed``, ``MetaConfig.seed``): the seeds of the task
#: slots' noise streams are derived from it.
MAX_META_SEED = 2**32 - 1

#: Most torch threads a ``--threads`` may ask for (more than 256 only stalls).
MAX_THREADS = 256

#: Inclusive bounds of the learned rules' sizes, enforced by the constructors, by the meta-training
#: config and by :func:`mpbackprop.rules.load_rule` before anything is built, so that a rule file of
#: a few kilobytes cannot ask for gigabytes: the largest update MLP (16 hidden layers of width 1024)
#: has 17M weights, 64 MB. The shipped rules use width 4 (``compact``) or 16 (``full``).
SIZE_LIMITS: dict[str, tuple[int, int]] = {"state_dim": (1, 8), "signal_dim": (1, 8), "hidden": (1, 1024),
                                           "layers": (1, 16)}
