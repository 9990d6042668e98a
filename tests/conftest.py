import os

# Triton kernels run in the interpreter on CPU; must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
