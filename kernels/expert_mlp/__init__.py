"""The knowledge experts' MLP: routed rows through grouped SwiGLU experts, gate-weighted back into their tokens.

    reference.py                 the oracles: loops over tokens and slots, obviously right
    torch_mlp.py, combine.py     the torch path (grouped GEMMs, oneDNN on CPU fp32)
    triton_up.py, triton_down.py, triton_wgrad.py, triton_mlp.py
                                 the Triton kernels (gather + SwiGLU, down + scatter, weight gradients) and the op
    triton_tiles.py              the tile loads and stores those kernels share (inlined ``triton.jit`` helpers)
    megablocks_mlp.py            megablocks' grouped GEMM (CUDA; a peer for the GPU benchmarks)
    dispatch.py                  ``knowledge_mlp(..., impl=...)``: the one seam between the layer and the above
    random_inputs.py             random routed inputs, shared by the tests and the fuzzer

Parameter lists repeat here by necessity, not by copy: ``torch.library`` infers each custom op's schema from
its own typed signature, a Triton kernel takes its arguments one by one, and every implementation's entry
point states the one contract of ``knowledge_mlp`` (which checks the arguments once, for all of them).
"""
