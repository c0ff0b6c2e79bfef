import os

# Triton's interpreter must be switched on before triton is first imported (design.md, "Kernels conventions"):
# on a machine without a GPU the Triton kernels then run on CPU tensors and are checked against the reference.
# On a CUDA machine the real kernels run (set TRITON_INTERPRET=1 yourself to force the interpreter).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Deterministic and quiet on a 2-core machine.
torch.manual_seed(0)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
