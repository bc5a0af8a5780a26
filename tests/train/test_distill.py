import dataclasses
import json

import pytest
import torch

import edkm
from edkm.train.distill import distill_loss, make_teacher
from edkm.train.loop import TrainingInterrupted, train
from tests.conftest import make_tiny_llama
from tests.train.test_loop import CFG as TRAIN_CFG
from tests.train.test_loop import _blocks


def test_distill_loss_is_the_mean_token_kl():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=g)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    got = distill_loss(student, teacher)
    torch.testing.assert_close(got, expected)
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    got.backward()
    # the gradient of the mean KL to the student logits: (softmax(s) - softmax(t)) / positions
    torch.testing.assert_close(student.grad, (student.softmax(-1) - p).detach() / 6)


def test_distill_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        distill_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


def _student_and_teacher(seed=0):
    model = make_tiny_llama(seed)
    teacher = make_teacher(model)
    edkm.palettize_(model, edkm.DKMConfig(bits=3, iters=2))
    return model, teacher


CFG = dataclasses.replace(TRAIN_CFG, distill=0.5)


def test_distilled_training_logs_both_terms_and_needs_a_teacher(tmp_path):
    model, teacher = _student_and_teacher()
    with pytest.raises(ValueError, match="needs a teacher"):
        train(model, _blocks(), CFG, run_dir=tmp_path / "none", show_progress=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train(model, _blocks(), CFG, run_dir=tmp_path / "run", show_progress=False, teacher=teacher)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    for r in log:
        assert r["kd"] > 0 and r["ce"] > r["kd"]
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5)
    # the teacher is only read
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_distillation_keeps_the_student_closer_to_the_teacher(tmp_path):
    blocks = _blocks(4)  # few blocks: plain training fits them and drifts from the teacher
    kd_after = {}
    for weight in (0.0, 1.0):
        cfg = dataclasses.replace(
            TRAIN_CFG, steps=10, batch_size=4, grad_accum=1, lr=3e-3, distill=weight
        )
        model, teacher = _student_and_teacher()
        train(
            model, blocks, cfg, run_dir=tmp_path / str(weight), show_progress=False, teacher=teacher
        )
        with torch.no_grad():
            kd_after[weight] = float(
                distill_loss(model(input_ids=blocks).logits, teacher(input_ids=blocks).logits)
            )
    assert kd_after[1.0] < 0.2 * kd_after[0.0]


def test_distilled_resume_gives_exactly_the_uninterrupted_weights(tmp_path, monkeypatch):
    blocks = _blocks()
    full, teacher = _student_and_teacher()
    train(full, blocks, CFG, run_dir=tmp_path / "full", show_progress=False, teacher=teacher)

    part, teacher = _student_and_teacher()
    monkeypatch.setenv("EDKM_TEST_SIGTERM_AT_STEP", "3")
    with pytest.raises(TrainingInterrupted):
        train(part, blocks, CFG, run_dir=tmp_path / "part", show_progress=False, teacher=teacher)
    monkeypatch.delenv("EDKM_TEST_SIGTERM_AT_STEP")
    resumed, teacher = _student_and_teacher()
    train(
        resumed,
        blocks,
        CFG,
        run_dir=tmp_path / "part",
        resume=True,
        show_progress=False,
        teacher=teacher,
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
