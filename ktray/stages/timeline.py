"""Where an inference pass's wall time went, from its shards' summary rows.

Each :class:`ktray.stages.shards.ShardWriter` stamps the rows it returns with its actor and
wall-clock times (its process start, the start of its ``__init__``: imports done, its model
loaded, each shard's start); :func:`timeline` turns a pass's rows into the one line the pass
logs at its end (a GPU pass's fixed cost: actor start-up, imports, model load, waiting for the
first decoded shard).
"""

from __future__ import annotations

import os


def timeline(stats: list[dict], began: float, ended: float) -> str:
    """Where a pass's wall time went, from its shards' summary rows (:class:`ShardWriter`):
    when the first model actor's process started, had imported the model code and had its
    model, when the first shard reached a model, and how busy the models were from then on
    (a GPU's share of the pass)."""
    actors: dict[str, dict] = {}
    for row in stats:
        actors.setdefault(row["actor"], row)

    def first(key: str) -> float:
        return min(a.get(key, a["born"]) for a in actors.values()) - began

    start = min(row["start"] for row in stats)
    # each actor's time from its first shard to the end of the pass
    span = sum(ended - min(r["start"] for r in stats if r["actor"] == a) for a in actors)
    busy = sum(row["seconds"] for row in stats) / max(span, 1e-9)
    spawned = first("spawned")
    up = f"after {spawned:.1f} s" if spawned >= 0 else "before the pass (a Ray worker kept)"
    return (
        f"{len(stats)} shards in {ended - began:.1f} s: the first model actor's process started "
        f"{up}, had imported its code after {first('born'):.1f} s "
        f"and had its model after {first('ready'):.1f} s; the first shard reached a model "
        f"after {start - began:.1f} s; from then on the {len(actors)} model actor(s) were "
        f"busy {busy:.0%} of the time"
    )


def steady_rate(stats: list[dict]) -> float | None:
    """Rows a second a pass's model actors finished from the end of its first shard to the end
    of its last (what a long pass gets once its start-up is paid); None below two shards."""
    ends = sorted((row["start"] + row["seconds"], row["rows"]) for row in stats)
    if len(ends) < 2 or ends[-1][0] <= ends[0][0]:
        return None
    return sum(rows for _, rows in ends[1:]) / (ends[-1][0] - ends[0][0])


def process_start() -> float | None:
    """When this process started (wall clock), from Linux's /proc; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None
