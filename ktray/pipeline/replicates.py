"""Seeds and spreads: a method run several times, summarised (no ray here).

``seeds=N`` trains every student method N times, replicate ``i`` with ``train.seed + i`` (the
student's init, batch order and augmentation; the labeled subset, the teacher and the logits
pass are shared). A replicate trained with seed ``s > 0`` writes to ``<method>~seed<s>``
(:func:`stage_name`), so seed 0 keeps the plain names.

:func:`aggregate` folds the per-seed result entries of one method into one: the mean of every
score (``test_accuracy``, ...), its sample standard deviation (``test_accuracy_std``, ddof=1),
``n_seeds`` and ``seeds`` (one entry per seed). :func:`compare` calls each pair of methods a win
or a tie: a difference of means no larger than the pair's spread ``sqrt(sd_a^2 + sd_b^2)`` (the
standard deviation of the difference between one run of each) is a tie.
"""

from __future__ import annotations

import math
import re

SEP = "~seed"
"""Separates a method's name from its replicate's seed in stage names."""
SCORES = (
    "test_accuracy",
    "distill_test_accuracy",
    "test_miou",
    "test_pixel_accuracy",
    "distill_test_miou",
)
"""Per-seed scores that get a mean and a standard deviation (``KEY_std``)."""
PER_SEED = SCORES + ("train_seconds",)
"""What each entry of ``seeds`` keeps (with ``seed`` and ``model``)."""


def train_seeds(base: int, n: int) -> list[int]:
    """The ``train.seed`` of each of ``n`` replicates: ``base``, ``base + 1``, ..."""
    return [int(base) + i for i in range(int(n))]


def stage_name(name: str, seed: int) -> str:
    """The output name of method/stage ``name`` trained with ``train.seed=seed``: ``name``
    itself for seed 0 (or an empty name), else ``name~seedN``."""
    return f"{name}{SEP}{int(seed)}" if name and seed else name


def split_name(name: str) -> tuple[str, int]:
    """Inverse of :func:`stage_name`: ``(method, seed)``."""
    m = re.fullmatch(rf"(.*){re.escape(SEP)}(\d+)", name or "")
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _fold(values: list):
    """One value for a key over the seeds: the value when every seed has the same, the mean of
    numbers, the element-wise mean of equal-length number lists, else the first seed's."""
    first = values[0]
    if all(v == first for v in values[1:]):
        return first
    if all(_number(v) for v in values):
        return mean(values)
    if all(isinstance(v, list) and len(v) == len(first) for v in values):
        cols = list(zip(*values))
        if all(all(_number(x) for x in c) for c in cols):
            return [mean(list(c)) for c in cols]
    return first


def aggregate(runs: list[tuple[int, dict, str]]) -> dict:
    """One method's result entry from its replicates ``[(train seed, entry, model dir)]``.

    One replicate: its entry plus ``n_seeds: 1``. More: every key folded over the seeds (the
    mean of numbers that differ), ``KEY_std`` (ddof=1) for each score of :data:`SCORES`,
    ``n_seeds`` and ``seeds`` (``seed``, the scores, ``train_seconds``, ``model`` per seed)."""
    if not runs:
        raise ValueError("no replicates to aggregate")
    if len(runs) == 1:
        return {**runs[0][1], "n_seeds": 1}
    entries = [e for _, e, _ in runs]
    keys = list(dict.fromkeys(k for e in entries for k in e))
    out = {k: _fold([e.get(k) for e in entries]) for k in keys}
    for k in SCORES:
        vals = [e.get(k) for e in entries]
        if k in out and all(_number(v) for v in vals):
            out[k] = mean(vals)
            out[f"{k}_std"] = std(vals)
    out["n_seeds"] = len(runs)
    out["seeds"] = [
        {"seed": s, **{k: e[k] for k in PER_SEED if k in e}, "model": model} for s, e, model in runs
    ]
    return out


def metric_of(results: dict) -> str:
    """The results' main score: ``test_miou`` (segmentation) or ``test_accuracy``."""
    return "test_miou" if results.get("task_type") == "segmentation" else "test_accuracy"


def cell(entry: dict, key: str, digits: int = 4) -> str:
    """A table cell: ``0.7550`` for one seed, ``0.7550 ± 0.0040`` with a spread, ``-`` when
    there is no value."""
    v = entry.get(key)
    if v is None:
        return "-"
    sd = entry.get(f"{key}_std")
    return f"{v:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def pairs(names: list[str]) -> list[tuple[str, str]]:
    """The comparisons the summary makes: every student method against ``scratch``, each
    ``task@X`` against ``features@X``, and the best student against ``teacher`` (added by
    :func:`compare`, which knows the scores)."""
    out = []
    if "scratch" in names:
        out += [(n, "scratch") for n in names if n not in ("teacher", "scratch")]
    for n in names:
        if n.startswith("task@") and "features@" + n[len("task@") :] in names:
            out.append((n, "features@" + n[len("task@") :]))
    return out


def compare(results: dict) -> list[dict]:
    """The summary's calls: ``{"a", "b", "diff" (mean a - mean b), "spread", "verdict"}`` with
    verdict ``beats`` (|diff| > spread; ``a`` is then the better one), ``tie`` or ``unknown`` (no
    spread: neither has more than one seed). ``spread = sqrt(sd_a^2 + sd_b^2)``, a method with
    one run (the teacher) counting 0."""
    metric = metric_of(results)
    methods = results.get("methods") or {}
    scored = {n: m for n, m in methods.items() if _number(m.get(metric))}
    names = list(scored)
    todo = pairs(names)
    students = [n for n in names if n != "teacher"]
    if "teacher" in scored and students:
        best = max(students, key=lambda n: scored[n][metric])
        todo.append((best, "teacher"))
    calls = []
    for a, b in todo:
        ma, mb = scored[a], scored[b]
        sa, sb = ma.get(f"{metric}_std"), mb.get(f"{metric}_std")
        diff = ma[metric] - mb[metric]
        if sa is None and sb is None:
            spread, verdict = None, "unknown"
        else:
            spread = math.sqrt((sa or 0.0) ** 2 + (sb or 0.0) ** 2)
            verdict = "tie" if abs(diff) <= spread else "beats"
        if verdict == "beats" and diff < 0:
            a, b, diff = b, a, -diff
        calls.append({"a": a, "b": b, "diff": diff, "spread": spread, "verdict": verdict})
    return calls


RULE = (
    "Seeds and spreads: each student method ran {n} times{seeds} (the teacher, the labeled "
    "images and the teacher's predictions are shared); cells show mean ± "
    "sample standard deviation (ddof=1). Two methods tie when their means differ by no more "
    "than the spread sqrt(sd_a^2 + sd_b^2), the standard deviation of the difference between "
    "one run of each (a method run once, the teacher, counts 0); a rule of thumb, not a "
    "significance test."
)


def summary(results: dict) -> list[str]:
    """The printed (and results.md) summary: the rule, then one line per comparison; with one
    seed, that no spread is known."""
    metric = metric_of(results)
    methods = results.get("methods") or {}
    counts = [m.get("n_seeds", 1) for n, m in methods.items() if n != "teacher"]
    if not counts or max(counts) < 2:
        return [
            "One seed per method: no spread is known, so no difference is called a win or a "
            "tie (seeds=N repeats every student method with N seeds)."
        ]
    seeds = results.get("train_seeds") or [
        s["seed"] for m in methods.values() for s in m.get("seeds") or [] if "seed" in s
    ]
    which = f", train.seed {min(seeds)} to {max(seeds)}" if seeds else ""
    lines = [RULE.format(n=max(counts), seeds=which)]
    for c in compare(results):
        if c["verdict"] == "beats":
            lines.append(
                f"{c['a']} beats {c['b']} by {c['diff']:.4f} {metric.replace('_', ' ')} "
                f"(spread {c['spread']:.4f})"
            )
        elif c["verdict"] == "tie":
            lines.append(
                f"{c['a']} and {c['b']} tie (|{c['diff']:.4f}| <= spread {c['spread']:.4f})"
            )
    return lines
