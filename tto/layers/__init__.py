"""Building blocks shared by the backbone and the mixers: RoPE, short causal convs, SwiGLU,
softmax attention with a (sliding-window) KV cache."""
