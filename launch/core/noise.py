"""Library noise: lines users should not have to read past to find tunefleet's own.

What is silenced, and why it is noise and not a warning the user needs:
- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on
  every CPU with AVX512-BF16 (an optional kernel download; the built-in kernel is used instead);
- deprecation warnings (`FutureWarning`, `DeprecationWarning`) raised inside the libraries
  tunefleet drives (torch.distributed's `all_gather_into_tensor` called by DeepSpeed, ...): the
  user cannot act on them;
- transformers' advisory warnings and progress bars (`quiet_transformers`, once it is imported).
Real problems still reach the user: errors, and warnings raised by tunefleet itself.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets")


def quiet_libraries() -> None:
    """Call first thing in a process (before the libraries are imported). Pure standard library."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    pattern = "|".join(LIBRARIES)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({pattern})(\.|$)")


def quiet_transformers() -> None:
    """transformers' own logging at error level and no progress bars of its own (weights loading)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
