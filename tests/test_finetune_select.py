"""Finetuning chosen on validation (finetune.select / val_every / patience, data.val_from):
the weights kept are the best evaluated step's (ties: the earlier), early stopping stops,
a restored run keeps the best it had, and the labeled budget is what the results say."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ktray import storage
from ktray.config import load_config
from ktray.data import columns as C
from ktray.errors import KtrayError
from ktray.metrics import evaluate_classifier
from ktray.train.loop import LocalSession, train_steps
from ktray.train.select import Selector, same_weights


def _snap(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _scripted(model: nn.Module, scores: list[float]):
    """An evaluate() returning ``scores`` in turn and recording the weights it saw."""
    seen: list[dict] = []

    def evaluate() -> float:
        seen.append(_snap(model))
        return scores[len(seen) - 1]

    return evaluate, seen


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(2, 2)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]

    def step(m, batch):
        xb, yb = batch
        return {"loss": nn.functional.cross_entropy(m(xb), yb), "n": len(yb)}

    return model, batches, step


def _train(model, batches, step, selector, session=None, steps=10, **kw):
    session = session or LocalSession("cpu")
    kw = dict(dict(report_every=5, checkpoint_every=2), **kw)
    m = train_steps(
        model,
        step,
        batches,
        session,
        steps=steps,
        lr=0.05,
        weight_decay=0.0,
        selector=selector,
        **kw,
    )
    return m, session


def test_the_best_evaluated_step_is_kept_and_a_tie_keeps_the_earlier_one():
    model, batches, step = _toy()
    # evaluations at steps 0, 2, 4, 5 (report), 6, 8, 10: the best (0.9) at 4 and again at 6
    scores = [0.2, 0.5, 0.9, 0.7, 0.9, 0.4, 0.3]
    evaluate, seen = _scripted(model, scores)
    sel = Selector(evaluate, model, every=2)
    m, session = _train(model, batches, step, sel)
    steps = [h["step"] for h in m["val_history"]]
    assert steps == [0, 2, 4, 5, 6, 8, 10]
    assert [h["val_accuracy"] for h in m["val_history"]] == scores
    assert m["selected_step"] == 4 and m["selected_val_accuracy"] == 0.9
    assert m["step"] == 10 and not m["stopped_early"]
    assert same_weights(model.state_dict(), seen[2])  # the weights of step 4, not the last
    assert not same_weights(seen[2], seen[-1])
    # every report carries the score of its step
    assert [r["val_accuracy"] for r in session.reports] == [0.7, 0.3]


def test_last_policy_keeps_the_last_weights():
    model, batches, step = _toy()
    evaluate, seen = _scripted(model, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    m, _ = _train(model, batches, step, Selector(evaluate, model, every=2, policy="last"))
    assert m["selected_step"] == 10 and m["select"] == "last"
    assert same_weights(model.state_dict(), seen[-1])


def test_real_validation_accuracy_peaks_mid_run_and_those_weights_are_kept():
    """The first 12 batches teach the validation labels, the next 12 the opposite ones: the
    validation accuracy (real evaluation) rises, then falls; the kept weights score the best
    and are the first step that reached it."""
    torch.manual_seed(1)
    model = nn.Linear(2, 2)
    x = torch.randn(96, 2)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    val = DataLoader(TensorDataset(x[:48], y[:48]), batch_size=16)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)]
    batches += [(xb, 1 - yb) for xb, yb in batches]
    with torch.no_grad():  # start wrong, so that the accuracy has to rise first
        model.weight.copy_(torch.tensor([[1.0, 0.3], [-1.0, -0.3]]))
        model.bias.zero_()
    seen = {}

    def evaluate():
        acc = evaluate_classifier(model, val, "cpu")["test_accuracy"]
        seen[len(seen)] = _snap(model)
        return acc

    def step(m, batch):
        xb, yb = batch
        return {"loss": nn.functional.cross_entropy(m(xb), yb), "n": len(yb)}

    sel = Selector(evaluate, model, every=2)
    m = train_steps(
        model,
        step,
        batches,
        LocalSession("cpu"),
        steps=24,
        lr=1.0,
        weight_decay=0.0,
        report_every=8,
        selector=sel,
    )
    hist = m["val_history"]
    accs = [h["val_accuracy"] for h in hist]
    best = max(accs)
    first = hist[accs.index(best)]["step"]
    assert 0 < first < 24 and best > accs[0] and best > accs[-1]
    assert m["selected_step"] == first and m["selected_val_accuracy"] == best
    assert evaluate_classifier(model, val, "cpu")["test_accuracy"] == best
    assert same_weights(model.state_dict(), seen[accs.index(best)])


def test_patience_stops_early_at_a_checkpointed_report():
    model, batches, step = _toy()
    evaluate, seen = _scripted(model, [0.5, 0.6, 0.4, 0.6, 0.9, 0.9])
    sel = Selector(evaluate, model, every=1, patience=2)
    m, session = _train(model, batches, step, sel, checkpoint_every=100)
    assert m["step"] == 3 and m["stopped_early"]  # steps 2 and 3 did not beat step 1
    assert m["selected_step"] == 1 and len(seen) == 4
    assert same_weights(model.state_dict(), seen[1])
    assert session.reports[-1]["step"] == 3 and session.last_state["step"] == 3
    assert session.last_state["selector"]["stop"]


def test_a_restored_run_keeps_the_best_it_had_before():
    model, batches, step = _toy()
    scores = [0.1, 0.3, 0.8, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    evaluate, seen = _scripted(model, scores)
    _, first = _train(model, batches, step, Selector(evaluate, model, every=1), report_every=2)
    state = next(s for s in first.states if s["step"] == 6)
    assert state["selector"]["best_step"] == 2
    # a new process: fresh model and selector, restored from the step-6 checkpoint
    model2, _, step2 = _toy(seed=5)
    evaluate2, seen2 = _scripted(model2, scores[7:])
    sel2 = Selector(evaluate2, model2, every=1)
    session = LocalSession("cpu", state=state)
    m, _ = _train(model2, batches, step2, sel2, session=session, report_every=2)
    assert m["resumed_from"] == 6 and len(seen2) == 4  # steps 7-10 only, no step 0 again
    assert m["selected_step"] == 2 and m["selected_val_accuracy"] == 0.8
    assert [h["step"] for h in m["val_history"]] == list(range(11))
    assert same_weights(model2.state_dict(), seen[2])


def test_selection_settings_are_checked():
    with pytest.raises(KtrayError, match="finetune.select"):
        load_config("tiny", ["finetune.select=best"])
    with pytest.raises(KtrayError, match="finetune.patience needs"):
        load_config("tiny", ["finetune.select=last", "finetune.patience=3"])
    with pytest.raises(KtrayError, match="data.val_from=extra needs data.labels_per_class"):
        load_config("tiny", ["data.val_per_class=2", "data.val_from=extra"])
    with pytest.raises(KtrayError, match="data.val_per_class must be <"):
        load_config("tiny", ["data.labels_per_class=2", "data.val_per_class=2"])
    # beyond the labels, the budget may hold as many validation as training images
    load_config("tiny", ["data.labels_per_class=2", "data.val_per_class=2", "data.val_from=extra"])
    # segmentation has no validation split: a val_per_class would be ignored, so it is refused
    with pytest.raises(KtrayError, match="data.val_per_class is not supported for segmentation"):
        load_config("demo_segmentation", ["data.val_per_class=2"])
    load_config("demo_segmentation", ["data.val_per_class=0"])


def _ids(uri: str) -> list[str]:
    return storage.read_parquet(uri).column(C.IMAGE_ID).to_pylist()


def _per_class(uri: str) -> dict:
    labels = storage.read_parquet(uri).column(C.LABEL).to_pylist()
    return {c: labels.count(c) for c in sorted(set(labels))}


def test_val_from_extra_draws_validation_beyond_the_labels(tiny_task, tmp_path):
    from ktray.pipeline.tasks import prepare_task
    from ktray.stages.run import labeled_budget

    def prep(name, *args):
        cfg = load_config(
            "tiny",
            [f"data.root={tiny_task}", f"out={tmp_path / name}", "data.labels_per_class=4"]
            + list(args),
        )
        return cfg, prepare_task(cfg)["outputs"]

    _, plain = prep("plain")
    cfg, extra = prep("extra", "data.val_per_class=2", "data.val_from=extra")
    _, carved = prep("carved", "data.val_per_class=2")
    # extra: the 4 labels per class stay the same images; 2 more per class validate
    assert _ids(extra["train"]) == _ids(plain["train"])
    assert _per_class(extra["train"]) == {0: 4, 1: 4, 2: 4}
    assert _per_class(extra["val"]) == {0: 2, 1: 2, 2: 2}
    train, val, unl = (set(_ids(extra[k])) for k in ("train", "val", "unlabeled"))
    assert not (train & val) and not (train & unl) and not (val & unl)
    # the unlabeled folder's 24 + the 8-4-2 train images per class left over
    assert len(unl) == 24 + 3 * 2 and len(_ids(plain["unlabeled"])) == 24 + 3 * 4
    assert set(_ids(plain["unlabeled"])) == unl | val
    # labels (default): carved out of the 4, the budget stays 4 per class
    assert _per_class(carved["train"]) == {0: 2, 1: 2, 2: 2}
    assert _per_class(carved["val"]) == {0: 2, 1: 2, 2: 2}
    assert set(_ids(carved["train"])) | set(_ids(carved["val"])) == set(_ids(plain["train"]))
    assert labeled_budget(cfg) == {
        "train_per_class": 4,
        "val_per_class": 2,
        "val_from": "extra",
        "total_per_class": 6,
    }
    with pytest.raises(KtrayError, match="data.val_from=extra: beyond the 6 labeled"):
        prep("small", "data.labels_per_class=6", "data.val_per_class=3", "data.val_from=extra")


def test_results_state_the_budget_and_the_selection_rule():
    from ktray.pipeline.reporting import budget_text, markdown, policy_text
    from ktray.stages.run import finetune_policy, labeled_budget

    cfg = load_config("tiny", ["data.labels_per_class=10", "data.val_per_class=2"])
    results = {
        "task": "t",
        "methods": {},
        "finetune_policy": finetune_policy(cfg),
        "labeled_budget": labeled_budget(cfg),
    }
    assert "best validation accuracy of evaluations every 25 steps, step 0" in policy_text(results)
    assert budget_text(results) == (
        "10 labeled images per class: 8 to train + 2 to validate, carved out of the labels "
        "(data.val_from=labels)."
    )
    assert budget_text(results) in markdown(results)
    last = load_config("tiny", ["finetune.select=last", "data.val_per_class=2"])
    assert finetune_policy(last)["select"] == "last step"
    none = load_config("tiny")
    assert finetune_policy(none)["select"] == "last step"
    assert budget_text({"labeled_budget": labeled_budget(none)}) == ""


@pytest.mark.slow
def test_finetune_stage_saves_the_selected_weights(tiny_task, tmp_path, ray_local):
    """ktray finetune (Ray Train, local mode) with a validation split: the manifest names an
    evaluated step, and the saved model scores exactly the manifest's val_accuracy."""
    from ktray.data.datasets import LabeledImages, collate_skip_none
    from ktray.models import load_model
    from ktray.pipeline import manifest
    from ktray.pipeline.tasks import prepare_task
    from ktray.stages.run import _student_entry

    cfg = load_config(
        "tiny",
        [
            f"data.root={tiny_task}",
            f"out={tmp_path / 'out'}",
            "data.val_per_class=3",
            "finetune.scratch_steps=8",
            "finetune.val_every=2",
            "finetune.scratch_lr=0.01",  # (here: best at step 2, tied at 4, worse at 8)
        ],
    )
    entry, model_dir = _student_entry(cfg, "scratch")
    out = manifest.stage_dir(cfg.out, "finetune", "scratch")
    ft = storage.read_json(storage.join(out, manifest.MANIFEST))
    hist = ft["val_history"]
    assert [h["step"] for h in hist] == [0, 2, 4, 6, 8]
    accs = [h["val_accuracy"] for h in hist]
    assert ft["select"] == "best_val" and ft["steps"] == 8
    assert ft["selected_step"] == hist[accs.index(max(accs))]["step"]
    assert ft["val_accuracy"] == max(accs)
    assert ft["selected_step"] < 8 and accs[-1] < max(accs)  # so saving the last would show
    assert entry["finetune_selected_step"] == ft["selected_step"]
    assert entry["val_accuracy"] == ft["val_accuracy"]
    model, spec = load_model(model_dir)
    val = storage.read_parquet(prepare_task(cfg)["outputs"]["val"])
    assert len(val) == 9
    loader = DataLoader(
        LabeledImages(val, spec["img_size"], spec["mean"], spec["std"], train=False),
        batch_size=256,
        collate_fn=collate_skip_none,
    )
    model = model.to(memory_format=torch.channels_last)
    assert evaluate_classifier(model, loader, "cpu")["test_accuracy"] == ft["val_accuracy"]


def test_finetune_spec_carries_the_selection_settings():
    from ktray.train.specs import FinetuneSpec, from_dict

    cfg = load_config("tiny", ["finetune.val_every=7", "finetune.patience=2"])
    spec = FinetuneSpec.from_config(cfg, scratch=True)
    assert (spec.select, spec.val_every, spec.patience) == ("best_val", 7, 2)
    assert from_dict(dataclasses.asdict(spec)) == spec


class _DDPSession(LocalSession):
    def __init__(self, rank: int, world_size: int):
        super().__init__("cpu")
        self.rank, self.world_size = rank, world_size

    def prepare_model(self, model):
        return nn.parallel.DistributedDataParallel(model)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model, batches, step = _toy()
        # rank 1's evaluate must never be called: its scores would pick another step
        scores = [0.5, 0.6, 0.4, 0.6, 0.9] if rank == 0 else [0.9, 0.1, 0.1, 0.1, 0.1]
        evaluate, seen = _scripted(model, scores)
        sel = Selector(evaluate, model, rank=rank, world_size=world_size, every=1, patience=2)
        session = _DDPSession(rank, world_size)
        m = train_steps(
            session.prepare_model(model),
            step,
            batches[rank::world_size],
            session,
            steps=10,
            lr=0.05,
            weight_decay=0.0,
            report_every=5,
            state_module=model,
            selector=sel,
        )
        torch.save(
            {
                "m": {k: m[k] for k in ("step", "selected_step", "val_history")},
                "calls": len(seen),
                "kept": same_weights(model.state_dict(), seen[1]) if seen else None,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_take_rank0s_decision_and_stop_together(tmp_path):
    """Two gloo DDP processes (no Ray): only rank 0 evaluates; both ranks get its scores, stop
    at the same step; rank 0 (the one that saves) ends with the best weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["m"] == r1["m"]
    assert r0["m"]["step"] == 3 and r0["m"]["selected_step"] == 1
    assert [h["val_accuracy"] for h in r1["m"]["val_history"]] == [0.5, 0.6, 0.4, 0.6]
    assert r0["calls"] == 4 and r1["calls"] == 0 and r0["kept"]
