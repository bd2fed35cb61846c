"""Reads for people looking at many runs at once (the dashboard, through the server's
API): how many runs match, runs grouped by a param or tag with each group's spread, the
columns runs have, and metric series cut to what a chart can show.

Each is one or two SQL statements filtered by project like every read of runs, so a
table of 100,000 runs never crosses into Python whole.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kiln.errors import ValidationError
from kiln.record.store._schema import metrics, runs, summary
from kiln.record.store.base import RunQuery, check_key

MAX_GROUPS = 1000
COLUMN_SAMPLE = 1000  # runs whose param, tag and metric names make the column list


class Views:
    """Mixed into :class:`~kiln.record.store.sql.SqlStore`."""

    if TYPE_CHECKING:  # what SqlStore provides

        @property
        def _mine(self) -> sa.ColumnElement[bool]: ...

        def _filters(self, query: RunQuery) -> list[sa.ColumnElement[bool]]: ...

        def connect(self) -> Connection: ...

    def count_matching(self, query: RunQuery) -> int:
        """How many runs match ``query`` (its order, limit and offset aside)."""
        stmt = sa.select(sa.func.count()).select_from(runs).where(*self._filters(query))
        with self.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def group_runs(self, query: RunQuery, by: str, keys: list[str]) -> list[dict[str, Any]]:
        """Runs matching ``query`` grouped by ``by`` (``params.NAME`` or ``tags.NAME``),
        largest groups first: per group its value, how many runs, and per metric of
        ``keys`` the mean, median, min and max over the runs that hold a finite number."""
        part, _, name = by.partition(".")
        if part not in ("params", "tags") or not name:
            raise ValidationError("by", f"{by!r} names no param or tag",
                                  allowed="params.NAME or tags.NAME")  # fmt: skip
        check_key(name, "by")
        # The value's JSON text: JSON itself cannot be grouped on PostgreSQL.
        value = sa.cast((runs.c.params if part == "params" else runs.c.tags)[name], sa.Text)
        where = self._filters(query)
        with self.connect() as conn:
            sizes: dict[str, int] = defaultdict(int)
            shown: dict[str, Any] = {}
            for held, n in conn.execute(
                sa.select(value.label("g"), sa.func.count()).where(*where).group_by(value)
            ):
                sizes[_group(held)] += n
                shown[_group(held)] = None if held is None else json.loads(held)
            figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for key in keys:
                stmt = (
                    sa.select(value.label("g"), summary.c.value)
                    .select_from(runs.join(summary, summary.c.run_id == runs.c.id))
                    .where(*where, summary.c.key == key, summary.c.value.is_not(None))
                )
                for held, number in conn.execute(stmt):
                    if math.isfinite(number):  # an infinite value has no mean to give
                        figures[_group(held)][key].append(number)
        order = sorted(sizes, key=lambda g: (-sizes[g], g))[:MAX_GROUPS]
        return [{"value": shown[g], "runs": sizes[g],
                 "metrics": {k: _spread(figures[g][k]) for k in keys if figures[g][k]}}
                for g in order]  # fmt: skip

    def run_columns(self, query: RunQuery) -> dict[str, list[str]]:
        """The param, tag and metric names of the newest runs matching ``query`` (up to
        :data:`COLUMN_SAMPLE` of them), sorted: what a runs table can show."""
        newest = (
            sa.select(runs.c.id, runs.c.params, runs.c.tags)
            .where(*self._filters(query))
            .order_by(runs.c.created_at.desc())
            .limit(COLUMN_SAMPLE)
        )
        params: set[str] = set()
        tags: set[str] = set()
        with self.connect() as conn:
            ids = []
            for run_id, held_params, held_tags in conn.execute(newest):
                ids.append(run_id)
                params.update(held_params or {})
                tags.update(held_tags or {})
            keys = conn.execute(
                sa.select(summary.c.key).where(summary.c.run_id.in_(ids)).distinct()
            ).scalars()
            names = sorted(keys)
        return {"params": sorted(params), "tags": sorted(tags), "metrics": names}

    def series(
        self,
        run_ids: list[str],
        keys: list[str],
        *,
        points: int,
        min_step: int | None = None,
        max_step: int | None = None,
    ) -> list[dict[str, Any]]:
        """Each metric of ``keys`` of each run as ``[step, value]`` pairs between the
        steps given. Where there are more than ``points`` points, the range is cut into
        ``points // 2`` buckets of steps and each keeps its lowest and its highest point:
        the extremes survive, and a chart as wide as
        ``points // 2`` pixels looks as it would with every point. Fewer points than
        that (a zoom) come back exact. A run of another project is not found."""
        if points < 2:
            raise ValidationError("points", f"must be >= 2, got {points}")
        window = [metrics.c.run_id == sa.bindparam("run"), metrics.c.key == sa.bindparam("key")]
        if min_step is not None:
            window.append(metrics.c.step >= min_step)
        if max_step is not None:
            window.append(metrics.c.step <= max_step)
        span = sa.select(sa.func.count(), sa.func.min(metrics.c.step),
                         sa.func.max(metrics.c.step)).where(*window)  # fmt: skip
        exact = (sa.select(metrics.c.step, metrics.c.value).where(*window)
                 .order_by(metrics.c.step, metrics.c.time))  # fmt: skip
        out: list[dict[str, Any]] = []
        with self.connect() as conn:
            mine = set(conn.execute(
                sa.select(runs.c.id).where(runs.c.id.in_(run_ids), self._mine)
            ).scalars())  # fmt: skip
            for run_id in [r for r in dict.fromkeys(run_ids) if r in mine]:
                for key in keys:
                    where = {"run": run_id, "key": key}
                    n, lo, hi = conn.execute(span, where).one()
                    if n <= points:
                        found = [[s, v] for s, v in conn.execute(exact, where)]
                    else:
                        found = _buckets(conn, window, where, lo, hi, points // 2)
                    out.append({"run": run_id, "key": key, "points": found, "total": n})
        return out


def _buckets(
    conn: Connection, window: list[Any], where: dict[str, str], lo: int, hi: int, n: int
) -> list[list[Any]]:
    """Per bucket of steps, its lowest and highest point, in step order. Buckets are
    reckoned in floating point: steps may span all of 64 bits."""
    offset = (sa.cast(metrics.c.step, sa.Float) - float(lo)) * (n / (float(hi) - float(lo) + 1))
    sqlite = conn.dialect.name == "sqlite"  # CAST truncates there; PostgreSQL's rounds
    bucket = (sa.cast(offset, sa.BigInteger) if sqlite else sa.func.floor(offset)).label("b")
    found: dict[tuple[int, int], Any] = {}
    if sqlite:  # a bare column takes the row of the min or max
        for extreme in (sa.func.min, sa.func.max):
            stmt = sa.select(bucket, extreme(metrics.c.value), metrics.c.step).where(*window)
            for b, value, step in conn.execute(stmt.group_by(bucket), where):
                found[(b, step)] = value
    else:
        ranked = sa.select(
            bucket, metrics.c.step, metrics.c.value,
            sa.func.row_number().over(partition_by=bucket, order_by=metrics.c.value).label("l"),
            sa.func.row_number().over(partition_by=bucket,
                                      order_by=metrics.c.value.desc()).label("h"),
        ).where(*window).subquery()  # fmt: skip
        stmt = sa.select(ranked.c.b, ranked.c.step, ranked.c.value).where(
            sa.or_(ranked.c.l == 1, ranked.c.h == 1)
        )
        for b, step, value in conn.execute(stmt, where):
            found[(b, step)] = value
    return [[step, found[(b, step)]] for b, step in sorted(found)]


def _group(text: str | None) -> str:
    """A group's key from its value's JSON text: values that are equal share one (1
    and 1.0 do; a run without the param is the group ``None``)."""
    value = None if text is None else json.loads(text)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))
    return repr(value)


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip
