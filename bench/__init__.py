"""Benchmark harness for the iMF engine: ``python -m bench {kernels,block,step,loader,scaling,all}``.

Modules (each a library returning rows; the CLI in :mod:`bench.__main__` writes the results):
``attention_bench`` (attention kernels vs SDPA / math JVP / jvp-flash-attention), ``block_ops_bench``
(per-op dual kernels), ``block_bench`` (one block and the whole network, dual forward + backward),
``step_bench`` (full training step vs the plain-PyTorch baselines and the flow-matching floor),
``loader_bench`` (latent loaders), ``scaling`` (FSDP2 scaling model), ``common`` (timing, env, output).
Nothing is imported here, so ``TRITON_INTERPRET`` can be set before the kernels load.
"""
