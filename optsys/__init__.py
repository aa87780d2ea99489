"""optsys: lean, fast post-training for LLMs."""

import logging

__version__ = "0.1.0"


class _DropMessages(logging.Filter):
    """Drops a library's log records that start with one of `prefixes`; its other records pass."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Two warnings every CPU run printed that are not the user's concern (only these messages; the loggers' other
# warnings still show). DeepSpeed, imported by transformers' save path, says it found no GPU; bitsandbytes, imported
# by peft, looks for an optional CPU kernel on the hub (unreachable here, and a top-level `kernels` is not that
# package). Filters stay on a logger that the library configures later.
logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward"))
