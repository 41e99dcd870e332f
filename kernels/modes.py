"""The per-row term of the sampling kernels, shared with their host code (plain ints: importing
this module needs no Triton)."""

ROW_NONE = 0  # z only
ROW_KL = 1  # closed-form KL(q || prior) per row
ROW_LOG_RATIO = 2  # log p(z) - log q(z | x) at the sample, for a diagonal Gaussian prior
ROW_NEG_LOG_Q = 3  # -log q(z | x) alone (the caller adds its own log p(z))

# Where a backward kernel writes an input's gradient.
GRAD_NONE = 0  # not wanted
GRAD_ROWS = 1  # one row per row of the (per-sample) layout
GRAD_PARTIAL = 2  # an input broadcast over every row: one partial sum per program
GRAD_SAMPLES = 3  # an input broadcast over a kernel's samples: summed over them, one per row
