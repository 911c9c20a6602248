"""Attention backends: dense-mask reference, blocked PyTorch, FlexAttention; `dispatch` chooses one."""
