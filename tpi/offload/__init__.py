"""The CPU/GPU offload: a rank with a GPU smaller than its share computes the blocks the GPU cannot
hold from host memory, on both at once.

plan.py (pure arithmetic: shares, GPU budget, the search over shares), ring.py (device and host
buffers), offloader.py (host blocks run from copies, projections divided by rows with the CPU; its
``linear`` is what the model's math is handed), blocks.py (one rank's host blocks under the
offload: divided blocks, prefetch), calibrate.py (what is measured and tuned at start). Model
math never sees the offload except as the ``linear`` it is handed (layers.py); forward.py decides
where each block runs, open_rank.py builds it all.
"""
