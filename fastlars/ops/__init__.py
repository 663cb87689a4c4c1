"""Fused kernels, one module per op. Imported lazily: they need Triton, and Triton's
interpreter (TRITON_INTERPRET=1) must be chosen before they are imported."""
