"""Training MoE language models: the loop (router losses, bias balancing) and the entry
point behind `sparselm train --moe`.

The loop is the built-in zoo's (AdamW, warm-up + cosine, random windows, clip 1.0) plus
what MoE needs: the router losses of all MoE layers are added to the LM loss, and after
each optimizer step the aux-loss-free balancing biases are updated from that step's load.
Reported losses are the LM cross-entropy alone, so MoE and dense curves compare directly.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparselm.moe.layer import total_aux_loss, update_balance_biases

BALANCE_MODES = ("aux", "bias", "none")


def train_lm(model, train_ids: torch.Tensor, *, steps: int, batch_size: int, seq_len: int, lr: float,
             seed: int = 0, warmup: int | None = None, weight_decay: float = 0.1, progress: bool = True,
             desc: str = "train", callback: Callable[[int, float], None] | None = None) -> dict:
    """Train `model` (MoE or dense) in place; returns {"losses": [...], "aux_losses": [...]}.

    `callback(step, loss)` runs after each optimizer step (and bias update).
    Batches depend only on `seed`, so two models trained with the same seed see the same
    tokens in the same order.
    """
    from sparselm.zoo.train import adamw_with_decay_groups, cosine_lr, random_windows

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = adamw_with_decay_groups(model, lr, weight_decay)
    model.train()
    losses, aux_losses = [], []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        batch = random_windows(train_ids, batch_size, seq_len, gen)  # [B, S+1]
        logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
        lm_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        aux = total_aux_loss(model)
        loss = lm_loss if aux is None else lm_loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_balance_biases(model)
        losses.append(lm_loss.item())
        aux_losses.append(0.0 if aux is None else aux.item())
        if callback is not None:
            callback(step, losses[-1])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"losses": losses, "aux_losses": aux_losses}


def build_moe_lm(vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int, context: int,
                 experts: int, top_k: int, expert_hidden: int, balance: str = "aux", shared_experts: int = 0,
                 aux_coef: float = 0.01, bias_rate: float = 1e-3, gate_scale: float | None = None,
                 tokenizer=None, seed: int = 0):
    """A fresh SparseMoeForCausalLM. balance: "aux" (Switch loss), "bias" (aux-loss-free), "none".

    gate_scale (default top_k): renormalised gates then sum to k, giving the routed
    output the scale of a dense MLP with k x expert_hidden neurons.
    """
    from sparselm.errors import SparselmError
    from sparselm.moe.modeling import SparseMoeConfig, SparseMoeForCausalLM

    if balance not in BALANCE_MODES:
        raise SparselmError(f"unknown balance mode {balance!r}; use one of {', '.join(BALANCE_MODES)}")
    torch.manual_seed(seed)
    config = SparseMoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=top_k * expert_hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, tie_word_embeddings=False, rope_theta=10000.0,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_hidden,
        num_shared_experts=shared_experts, router_aux_loss_coef=aux_coef if balance == "aux" else 0.0,
        router_z_loss_coef=1e-3, bias_update_rate=bias_rate if balance == "bias" else 0.0,
        routed_scaling_factor=float(top_k if gate_scale is None else gate_scale),
        **_special_tokens(tokenizer))
    return SparseMoeForCausalLM(config)


def build_dense_lm(vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int, context: int,
                   intermediate: int, tokenizer=None, seed: int = 0):
    """A fresh LlamaForCausalLM with the same attention/embeddings as `build_moe_lm`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, tie_word_embeddings=False, rope_theta=10000.0,
                         **_special_tokens(tokenizer))
    return LlamaForCausalLM(config)


def _special_tokens(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def load_tokenizer(name_or_path: str, corpus):
    """A built-in model's tokenizer (trained on `corpus`) or one from a local HF folder."""
    from sparselm.zoo import BUILTIN_SPECS, load_builtin

    if name_or_path in BUILTIN_SPECS and not Path(name_or_path).exists():
        return load_builtin(name_or_path, corpus)[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparselm train --moe",
                                description="Train a mixture-of-experts LM from scratch on a corpus.")
    p.add_argument("--corpus", default=None, help="text file or folder (default: the built-in corpus)")
    p.add_argument("--tokenizer", default="tiny", help="built-in model name or HF folder whose tokenizer to use")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=128, help="hidden size of each SwiGLU expert")
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--balance", choices=BALANCE_MODES, default="aux",
                   help="aux: Switch balance loss; bias: aux-loss-free bias; none")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for perplexity")
    p.add_argument("--out", required=True, help="output folder for the trained model")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry of `sparselm train --moe`: train, evaluate held-out perplexity and routing
    balance, save (HF layout, safetensors) and print one JSON line."""
    from sparselm.data import load_corpus
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.evaluate import perplexity
    from sparselm.moe.io import save_moe
    from sparselm.moe.layer import model_routing_metrics, reset_routing_stats

    args = build_parser().parse_args(argv)
    corpus = load_corpus(args.corpus)
    tokenizer = load_tokenizer(args.tokenizer, corpus)
    train_ids = corpus_token_ids(tokenizer, corpus, "train")
    model = build_moe_lm(len(tokenizer), hidden=args.hidden, layers=args.layers, heads=args.heads,
                         kv_heads=args.kv_heads, context=args.context, experts=args.experts, top_k=args.top_k,
                         expert_hidden=args.expert_hidden, balance=args.balance,
                         shared_experts=args.shared_experts, tokenizer=tokenizer, seed=args.seed)
    t0 = time.time()
    history = train_lm(model, train_ids, steps=args.steps, batch_size=args.batch_size, seq_len=args.context,
                       lr=args.lr, seed=args.seed, desc="train moe")
    reset_routing_stats(model)
    ppl = perplexity(model, corpus_token_ids(tokenizer, corpus, "validation"), args.context,
                     max_windows=args.eval_windows)
    routing = model_routing_metrics(model)
    last = history["losses"][-20:]
    summary = {"validation_perplexity": ppl, "final_train_loss": sum(last) / len(last),
               "train_seconds": time.time() - t0, "routing": routing,
               "total_params": sum(p.numel() for p in model.parameters())}
    save_moe(model, tokenizer, args.out, metadata={"training": {**vars(args), **summary}}, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0
