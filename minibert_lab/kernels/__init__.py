"""The math of every attention kind, framework-neutral, split by idea:

- `core`: constants, RoPE, masks, the registry of kinds (fast and naive float64 forms side by side), linear-time cores, `attention_core`;
- `reference`: the float64 oracle `reference_attention` and the test tolerances;
- `approx`: the approximation study (each approximating kind against its target kernel);
- `blockwise`: the exact kinds tile by tile, memory linear in L (`attention_core(..., memory=...)` dispatches to it).

`from minibert_lab import kernels` gives all four under one name."""
from .core import *
from .reference import *
from .approx import *
from .blockwise import *
