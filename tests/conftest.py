import os

import torch

# Deterministic and quiet on a 2-core machine.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
