"""PyTorch implementations of wdjax's training steps, written as a PyTorch user would write them
(plain tensors, `scaled_dot_product_attention`, fused AdamW, bf16 autocast, `torch.compile`),
for parity tests (`tests/test_torch_parity.py`) and side-by-side speed benchmarks.

Nothing under `wdjax/` imports this package; it imports nothing from `wdjax` either, so the
parity tests compare two independent implementations of the same maths.
"""
