"""The one reading of TRITON_INTERPRET, shared by the kernels, the AOT compile and the test and benchmark setup.

Triton decides when it is imported whether kernels run through its interpreter, so TRITON_INTERPRET must be
set before anything imports triton. This module imports nothing but `os`, and `lorafuse/__init__.py` imports
nothing at all, so a conftest can read the switch (and set it) before triton is loaded; a helper inside
`lorafuse.kernels` could not, since importing that package imports every kernel and triton with them.
"""

from __future__ import annotations

import os

OFF = ("", "0", "false", "off")


def interpreter_requested(environ=os.environ) -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter: anything but "", "0", "false" or "off" (any case,
    surrounding whitespace ignored); unset is off."""
    return environ.get("TRITON_INTERPRET", "").strip().lower() not in OFF
