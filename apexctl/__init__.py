"""apexctl: APEX one-step distillation for text-to-image flow models."""

import logging

__version__ = "0.1.0"

# bitsandbytes (which peft imports when it is installed) warns on CPUs with AVX-512 BF16 that an optional hub kernel
# for 4-bit matmuls is missing, on every command; apexctl never runs 4-bit matmuls on the CPU
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
