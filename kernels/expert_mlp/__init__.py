"""The knowledge experts' MLP: routed rows through grouped SwiGLU experts, gate-weighted back into their tokens.

    reference.py                 the oracles: loops over tokens and slots, obviously right
    torch_mlp.py, combine.py     the torch path (grouped GEMMs, oneDNN on CPU fp32)
    triton_up.py, triton_down.py, triton_wgrad.py, triton_mlp.py
                                 the Triton kernels (gather + SwiGLU, down + scatter, weight gradients) and the op
    megablocks_mlp.py            megablocks' grouped GEMM (CUDA; a peer for the GPU benchmarks)
    dispatch.py                  ``knowledge_mlp(..., impl=...)``: the one seam between the layer and the above
    random_inputs.py             random routed inputs, shared by the tests and the fuzzer
"""
