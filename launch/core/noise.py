"""Library noise: lines users should not have to read past to find tunefleet's own.

What is silenced, and why it is noise and not a warning the user needs:
- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on
  every CPU with AVX512-BF16 (an optional kernel download; the built-in kernel is used instead);
- deprecation warnings (`FutureWarning`, `DeprecationWarning`) raised inside the libraries
  tunefleet drives (torch.distributed's `all_gather_into_tensor` called by DeepSpeed, ...): the
  user cannot act on them;
- transformers' advisory warnings and progress bars (`quiet_transformers`, once it is imported).
- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
  detect it." on every import on a machine without a GPU (every rank, before tunefleet's own first
  line): on CPU that is what was asked for. It is logged at DEBUG instead (`_Demote`);
- the `kernels` package's notes about optional kernel downloads ("Skipping publisher trust check for
  'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode"):
  errors only.
Real problems still reach the user: errors, and warnings raised by tunefleet itself.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets")


class _Demote(logging.Filter):
    """Log records whose message starts with one of `prefixes` at DEBUG instead of their level (the
    handlers a library sets up at WARNING then drop them)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.prefixes):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


DEEPSPEED_ON_CPU = "Setting accelerator to CPU"


def quiet_libraries() -> None:
    """Call first thing in a process (before the libraries are imported). Pure standard library."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    deepspeed = logging.getLogger("DeepSpeed")  # the logger DeepSpeed configures when it is imported
    if not any(isinstance(f, _Demote) for f in deepspeed.filters):
        deepspeed.addFilter(_Demote(DEEPSPEED_ON_CPU))
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    pattern = "|".join(LIBRARIES)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({pattern})(\.|$)")


def quiet_transformers() -> None:
    """transformers' own logging at error level and no progress bars of its own (weights loading)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
