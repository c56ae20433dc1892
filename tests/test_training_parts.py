"""The trainer's parts on their own: the trainer state's file format across versions and the translation task's
loss against torch's own cross-entropy."""
import torch
import torch.nn.functional as F

from transformer_ln.training.state import State
from transformer_ln.training.task import TASKS, TranslationTask, get_task

from conftest import tiny_model, tiny_run_config


def test_a_trainer_state_written_with_the_old_extra_dict_reads_into_the_typed_fields():
    old = {"update": 9, "epoch": 2, "best_update": 8, "extra": {"best_pending": True, "bad_valid_update": 9},
           "unknown_later_field": 1}
    st = State.from_dict(old)
    assert (st.update, st.epoch, st.best_update, st.best_pending, st.bad_valid_update) == (9, 2, 8, True, 9)
    assert State.from_dict(st.to_dict()) == st


def test_the_translation_task_loss_is_torch_cross_entropy_with_label_smoothing(tmp_path):
    cfg = tiny_run_config(tmp_path, "optim.label_smoothing=0.1", "model.src_vocab_size=50",
                          "model.tgt_vocab_size=50")
    task = get_task(cfg)
    assert isinstance(task, TranslationTask) and set(TASKS) == {"translation", "language_model"}
    model = tiny_model("pre_ln").eval()
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, 50, (3, 7), generator=g), torch.randint(4, 50, (3, 6), generator=g)
    tgt[1, 4:] = cfg.model.pad_id
    batch = {"src": src, "tgt_in": tgt, "tgt_out": tgt.roll(-1, dims=1), "ntokens": 0}
    batch["tgt_out"][1, 3:] = cfg.model.pad_id
    loss, nll = task.loss(model, batch)
    logits = model(src, tgt).double().reshape(-1, 50)
    target = batch["tgt_out"].reshape(-1)
    want_loss = F.cross_entropy(logits, target, ignore_index=cfg.model.pad_id, label_smoothing=0.1, reduction="sum")
    want_nll = F.cross_entropy(logits, target, ignore_index=cfg.model.pad_id, reduction="sum")
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-5, atol=1e-4)
