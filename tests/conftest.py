"""Shared test settings.

The target networks in tests are tiny: torch's intra-op threads only add synchronisation
cost there (and stall badly when the 2 CI cores are shared), so tests run single-threaded.
"""

import torch

torch.set_num_threads(1)
