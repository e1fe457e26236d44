import torch

# Tiny test models make many small ops; on a 2-core machine the intra-op thread pool
# costs far more than it saves on them (ms instead of us per matmul).
torch.set_num_threads(1)
