"""The TrainerCallback driven the way Trainer drives it, and checkpoint resume."""
import shutil
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from sparselm.training import SparseTrainingConfig
from sparselm.training import sparse_training_loop as loop
from sparselm.training.trainer_callback import SparseTrainingCallback


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64))


def test_trainer_callback_keeps_masks_through_trainer_events():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = SparseTrainingCallback(SparseTrainingConfig(sparsity=0.75, method="rigl", total_steps=99, update_interval=2))
    handler = CallbackHandler([cb], model, None, opt, None)
    state, control, args = TrainerState(max_steps=6), TrainerControl(), types.SimpleNamespace()
    handler.on_train_begin(args, state, control)
    assert cb.manager.config.total_steps == 6  # the Trainer's max_steps wins
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        handler.on_pre_optimizer_step(args, state, control)
        opt.step()
        handler.on_optimizer_step(args, state, control)
        model.zero_grad()
        handler.on_step_end(args, state, control)
        for t in cb.manager.targets:
            assert (t.param[~cb.manager.masks[t.name]] == 0).all()
    handler.on_train_end(args, state, control)
    assert cb.report["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert [h["step"] for h in cb.manager.history] == [2]  # RigL stops at 0.75 * 6 steps


def test_resume_from_checkpoint_reproduces_the_run(tmp_path, monkeypatch):
    ids = torch.randint(0, 96, (3000,), generator=torch.Generator().manual_seed(1))
    cfg = SparseTrainingConfig(sparsity=0.8, method="set", total_steps=6, update_interval=2)
    kwargs = dict(steps=6, batch_size=4, seq_len=12, lr=1e-2, eval_every=3, checkpoint_every=3, progress=False)
    saved = loop._atomic_torch_save

    def keep_step3(obj, path):
        saved(obj, path)
        if obj["step"] == 3:
            (tmp_path / "b").mkdir()
            shutil.copy(path, tmp_path / "b" / loop.CHECKPOINT)

    monkeypatch.setattr(loop, "_atomic_torch_save", keep_step3)
    full = loop.train_sparse(tiny_llama(), ids, ids[:400], cfg, out_dir=tmp_path / "a", **kwargs)
    monkeypatch.setattr(loop, "_atomic_torch_save", saved)
    resumed = loop.train_sparse(tiny_llama(), ids, ids[:400], cfg, out_dir=tmp_path / "b", **kwargs)
    assert resumed.losses == full.losses  # steps 1-3 restored, 4-6 recomputed identically
    assert all(torch.equal(resumed.masks[n], full.masks[n]) for n in full.masks)
    assert not list((tmp_path / "a").glob(".*.tmp"))  # no temporary files left behind
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 2


def test_callback_inside_a_real_trainer(tmp_path):
    """`transformers.Trainer` itself drives the callback: RigL updates the masks, the Trainer's
    AdamW never revives a masked weight, and the run ends at the target sparsity."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 96, (16,), generator=g) for _ in range(16)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    cb = SparseTrainingCallback(SparseTrainingConfig(sparsity=0.75, method="rigl", total_steps=99, update_interval=2))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    initial = {}

    class Snapshot(SparseTrainingCallback.__mro__[1]):  # a plain TrainerCallback, after ours in the list
        def on_train_begin(self, args, state, control, **kwargs):
            initial.update({name: mask.clone() for name, mask in cb.manager.masks.items()})

    trainer.add_callback(Snapshot())
    trainer.train()
    manager = cb.manager
    assert manager.config.total_steps == 8  # the Trainer's max_steps wins
    assert manager.optimizer is trainer.optimizer or manager.optimizer is getattr(trainer.optimizer, "optimizer", None)
    assert [h["step"] for h in manager.history] == [2, 4]  # RigL updates end before 0.75 * 8 steps
    assert any(not torch.equal(initial[n], m) for n, m in manager.masks.items())  # connections moved
    for t in manager.targets:
        mask = manager.masks[t.name]
        assert int(mask.sum()) == int(initial[t.name].sum())  # same number active per layer
        assert (t.param.detach()[~mask] == 0).all()
    assert cb.report["sparsity"] == pytest.approx(0.75, abs=1e-3)
