"""You-may-like: implicit ALS on member x item purchase weights, ranked with the member's own history so that
replenishable items come back when they are due; popular and trending items for members with no history;
"because you bought X" from ALS's explain.

**Weights.** Each purchase line before the as-of date counts ``0.5 ** (age_days / half_life_days)``; the
decayed counts of a member x item pair are weighted by BM25 (implicit's ``bm25_weight`` over items x
members, as in implicit's examples) or ``log(1 + count)`` (``settings.recommend.weighting``), and ALS fits
on them with confidence ``alpha * weight``.

**Ranking** (one score for every candidate of a member, highest first):

- items the member never bought: ``(1 - blend) * als``, from implicit's top-k with the member's bought items
  and the blocked ones filtered;
- items the member bought that are *rebuyable* (below) and *due*:
  ``blend * own * timing + (1 - blend) * als``. ``own`` is the item's purchase days over the member's
  largest (the decayed count breaks ties). With ``cycle`` the member's mean gap between purchase days of
  the item (bought on two days or more), else the item's median cycle over members, else its category's,
  else the median over all items, and ``ahead = (days since the last purchase + lookahead_days) / cycle``:
  the item is due when ``ahead >= due_from`` and ``timing = min(1, ahead) ** due_power`` ranks items due
  sooner higher;
- items the member bought that are durable (not rebuyable), or rebuyable but not due: not recommended.

An item is *rebuyable* when the items table marks it replenishable, or when at least ``repeat_share`` of
its buyers bought it on two days or more before the cutoff (for an item the table marks durable, at least
one must have): a snack the catalogue does not call replenishable but members buy every week comes back; a
phone nobody bought twice stays filtered; with ``repeat_share`` 0 an item of unknown kind is rebuyable.
Business filters: items and categories to exclude, the out-of-stock file, a category filter and a cap per
category. The parameters in :data:`PARAMS` are tuned on a time split (:func:`training.recommend_eval.tune`).

Example::

    rec = Recommender(settings).fit(lines, items, members, cutoff=date(2025, 10, 1))
    rec.recommend(["m1", "m2"], n=10)                 # member_id, rank, item_id, score, source, reason
    rec.recommend(["m1"], history=History.build(...)) # newer purchases: factors recalculated for them
    rec.similar_items("i7", n=5)
    rec.save(path); Recommender.load(path)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.contract import C
from features.lake import atomic_path
from features.settings import Settings, load_settings

log = logging.getLogger(__name__)

DAY = pd.Timedelta(days=1)
_TOPK_BATCH = 4096  # members per unfiltered top-k call
FORMAT = "repurchase.recommender/1"


class RC:
    """Columns of :meth:`Recommender.recommend`."""

    MEMBER_ID = C.MEMBER_ID
    RANK = "rank"  # 1 = best
    ITEM_ID = C.ITEM_ID
    SCORE = "score"
    SOURCE = "source"  # als / own_history / popular
    BECAUSE = "because_item"  # the bought item that explains an ALS pick (explain=True), else null
    REASON = "reason"  # plain words
    COLD_START = "cold_start"  # the member had no purchases: the popular list of their group
    COLUMNS = (MEMBER_ID, RANK, ITEM_ID, SCORE, SOURCE, BECAUSE, REASON, COLD_START)


SOURCE_ALS = "als"
SOURCE_OWN = "own_history"
SOURCE_POPULAR = "popular"
PARAMS = ("factors", "regularization", "alpha", "iterations", "weighting", "half_life_days", "blend", "due_from",
          "due_power", "repeat_share")
"""Settings of ``settings.recommend`` a fitted model carries (and tuning searches)."""


def purchase_lines(lines: pd.DataFrame) -> pd.DataFrame:
    """The purchase lines (returns left out) with the columns the recommender reads, checked."""
    missing = [c for c in (C.MEMBER_ID, C.ITEM_ID, C.TS) if c not in lines.columns]
    if missing:
        raise KeyError(f"lines lack column(s) {', '.join(missing)}")
    cols = [c for c in (C.MEMBER_ID, C.ITEM_ID, C.TS, C.ORDER_ID, C.CATEGORY) if c in lines.columns]
    out = lines[cols]
    if C.IS_RETURN in lines.columns:
        out = out[~lines[C.IS_RETURN].fillna(False).astype(bool).to_numpy()]
    for col in (C.MEMBER_ID, C.ITEM_ID, C.TS):
        if out[col].isna().any():
            row = out.index[out[col].isna().to_numpy()][0]
            raise ValueError(f"lines: row {row}, column {col!r} is missing")
    return out


def _utc(t: date | datetime | pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


@dataclass
class History:
    """Purchases of members before ``as_of``, one entry per member x item (CSR layout over ``items``):
    decayed count, days since the last purchase, and the member's mean gap between purchase days of the
    item (NaN when bought on one day only)."""

    as_of: pd.Timestamp
    members: pd.Index
    items: pd.Index
    indptr: np.ndarray
    indices: np.ndarray
    weight: np.ndarray
    days_since: np.ndarray
    own_gap: np.ndarray
    count: np.ndarray  # purchase days of the item
    last_ts: np.ndarray  # per member: their latest purchase (ns since epoch, UTC)
    _confidence: dict[str, sp.csr_matrix] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, lines: pd.DataFrame, as_of: date | datetime | pd.Timestamp | str, items: pd.Index,
              half_life_days: float) -> History:
        """From purchase lines strictly before ``as_of``; items not in ``items`` (new since the model was
        fitted: ALS has no factor for them) are left out of the matrix and counted in the log."""
        as_of = _utc(as_of)
        p = purchase_lines(lines)
        p = p[p[C.TS] < as_of]
        code = items.get_indexer(p[C.ITEM_ID])
        unknown = int((code < 0).sum())
        if unknown:
            log.info("history: %d purchase lines of %d items the model does not know are left out", unknown,
                     p.loc[code < 0, C.ITEM_ID].nunique())
        p = p[code >= 0]
        code = code[code >= 0]
        m_code, members = pd.factorize(p[C.MEMBER_ID], sort=True)
        age = ((as_of - p[C.TS]) / DAY).to_numpy(dtype=np.float64)
        day = np.floor((p[C.TS] - pd.Timestamp("1970-01-01", tz="UTC")) / DAY).to_numpy(dtype=np.int64)
        g = pd.DataFrame({"m": m_code, "i": code, "age": age, "w": 0.5 ** (age / half_life_days), "day": day})
        agg = (g.groupby(["m", "i"], sort=True)
               .agg(w=("w", "sum"), age=("age", "min"), first=("day", "min"), last=("day", "max"),
                    days=("day", "nunique")))
        m = agg.index.get_level_values("m").to_numpy()
        indptr = np.zeros(len(members) + 1, dtype=np.int64)
        np.add.at(indptr, m + 1, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.where(agg["days"] >= 2, (agg["last"] - agg["first"]) / (agg["days"] - 1), np.nan)
        last_ts = (p.groupby(m_code)[C.TS].max() - pd.Timestamp("1970-01-01", tz="UTC")).to_numpy() \
            .astype("timedelta64[ns]").astype(np.int64)
        return cls(as_of=as_of, members=pd.Index(members), items=items, indptr=np.cumsum(indptr),
                   indices=agg.index.get_level_values("i").to_numpy(dtype=np.int32),
                   weight=agg["w"].to_numpy(dtype=np.float32), days_since=agg["age"].to_numpy(dtype=np.float32),
                   own_gap=gap.astype(np.float32), count=agg["days"].to_numpy(dtype=np.float32),
                   last_ts=last_ts)

    def matrix(self, values: np.ndarray | None = None) -> sp.csr_matrix:
        v = self.weight if values is None else values
        return sp.csr_matrix((v, self.indices, self.indptr), shape=(len(self.members), len(self.items)))

    def rows(self, member_ids: Sequence[Any]) -> np.ndarray:
        """Row of each member id (-1 when they have no purchases here)."""
        return self.members.get_indexer(pd.Index(member_ids))

    def entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For the members at ``rows``: each of their entries' position in ``rows`` and in the CSR arrays."""
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        take = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens - starts, lens)
        return np.repeat(np.arange(len(rows)), lens), take

    def confidence(self, weighting: str) -> sp.csr_matrix:
        """:func:`confidence` of the whole history (BM25's idf spans every member), computed once."""
        if weighting not in self._confidence:
            self._confidence[weighting] = confidence(self.matrix(), weighting)
        return self._confidence[weighting]


def confidence(weights: sp.csr_matrix, weighting: str) -> sp.csr_matrix:
    """Member x item ALS input from decayed counts (float32 CSR)."""
    if weighting == "bm25":
        from implicit.nearest_neighbours import bm25_weight

        out = bm25_weight(weights.T.tocoo(), K1=100, B=0.8).T.tocsr()
    elif weighting == "log":
        out = weights.copy()
        out.data = np.log1p(out.data)
    else:
        raise ValueError(f"weighting must be 'bm25' or 'log', got {weighting!r}")
    out = out.astype(np.float32)
    out.eliminate_zeros()
    return out


def _threads() -> None:
    """BLAS on one thread: implicit runs its own threads (``recommend.num_threads``)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # PITFALLS: BLAS threads fight implicit's own
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, "blas")
    except Exception:  # pragma: no cover - threadpoolctl is a dependency of scikit-learn
        pass


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal ``keys`` (keys sorted, or at least grouped)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.r_[True, keys[1:] != keys[:-1]]
    idx = np.arange(len(keys))
    return idx - np.maximum.accumulate(np.where(start, idx, 0))


class Recommender:
    """ALS plus the repurchase-aware ranking, the cold-start lists and the ID maps (module docstring)."""

    def __init__(self, settings: Settings | None = None, **params: Any) -> None:
        self.settings = settings or load_settings()
        rs = self.settings.recommend
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"unknown recommender parameter(s) {sorted(unknown)}; known: {PARAMS}")
        self.params: dict[str, Any] = {k: params.get(k, getattr(rs, k)) for k in PARAMS}
        self.cutoff: pd.Timestamp | None = None
        self.items: pd.Index = pd.Index([])
        self.members: pd.Index = pd.Index([])
        self.item_category: np.ndarray = np.array([], dtype=object)
        self.replenishable: np.ndarray = np.array([], dtype=bool)
        self.item_cycle: np.ndarray = np.array([], dtype=np.float32)
        self.item_names: dict[str, str] = {}
        self.popular: dict[str, np.ndarray] = {}  # group -> item codes, most buyers first ("" = everyone)
        self.popular_share: dict[str, np.ndarray] = {}
        self.trending: dict[str, np.ndarray] = {}
        self.member_group: pd.Series = pd.Series(dtype=object)
        self.history: History | None = None
        self.als: Any = None
        self._prune = True  # skip the ALS pass where own candidates provably fill the top n (tests turn it off)

    # --- fitting ------------------------------------------------------------------------------------------

    def fit(self, lines: pd.DataFrame, items: pd.DataFrame | None = None, members: pd.DataFrame | None = None,
            cutoff: date | datetime | str | None = None) -> Recommender:
        """Fit on the purchase lines strictly before ``cutoff`` (default: after the last line). ``items``
        (item_id, category, replenishable, item_name) and ``members`` (member_id and the cold-start
        attribute) are optional: categories then come from the lines, replenishment is inferred."""
        from implicit.cpu.als import AlternatingLeastSquares

        p = purchase_lines(lines)
        self.cutoff = _utc(cutoff) if cutoff is not None else p[C.TS].max().floor("D") + DAY
        p = p[p[C.TS] < self.cutoff]
        if p.empty:
            raise ValueError(f"no purchase lines before the cutoff {self.cutoff.date()}: nothing to learn")
        self.items = pd.Index(np.sort(p[C.ITEM_ID].unique()))
        self.history = History.build(p, self.cutoff, self.items, self.params["half_life_days"])
        self.members = self.history.members
        self._item_meta(p, items)
        self._popularity(p, members)
        _threads()
        self.als = AlternatingLeastSquares(
            factors=int(self.params["factors"]), regularization=float(self.params["regularization"]),
            alpha=float(self.params["alpha"]), iterations=int(self.params["iterations"]),
            random_state=self.settings.recommend.seed, num_threads=self.settings.recommend.num_threads)
        self.als.fit(self.history.confidence(self.params["weighting"]), show_progress=False)
        log.info("recommender: %d members x %d items, %d pairs, %d factors", len(self.members), len(self.items),
                 len(self.history.indices), self.als.factors)
        return self

    def _item_meta(self, p: pd.DataFrame, items: pd.DataFrame | None) -> None:
        n = len(self.items)
        cat = pd.Series(np.full(n, None, dtype=object), index=self.items)
        repl = pd.Series(np.full(n, np.nan), index=self.items)
        if items is not None and len(items):
            meta = items.drop_duplicates(C.ITEM_ID).set_index(C.ITEM_ID).reindex(self.items)
            if C.CATEGORY in meta:
                cat = meta[C.CATEGORY].astype(object)
            if C.REPLENISHABLE in meta:
                repl = meta[C.REPLENISHABLE].astype("float64")
            if C.ITEM_NAME in meta:
                names = meta[C.ITEM_NAME].dropna()
                self.item_names = {str(k): str(v) for k, v in names.items()}
        if cat.isna().any() and C.CATEGORY in p.columns:
            from_lines = p.drop_duplicates(C.ITEM_ID, keep="last").set_index(C.ITEM_ID)[C.CATEGORY]
            cat = cat.fillna(from_lines.reindex(self.items))
        self.item_category = cat.fillna("").astype(str).to_numpy(dtype=object)
        h = self.history
        assert h is not None
        buyers = np.bincount(h.indices, minlength=n)
        repeat = np.bincount(h.indices, weights=np.isfinite(h.own_gap), minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = repeat / np.maximum(buyers, 1)
        threshold = float(self.params["repeat_share"])
        flag = repl.to_numpy()
        rebought = share >= threshold  # members do buy it again, whatever the catalogue says
        self.replenishable = np.where(np.isnan(flag), rebought, (flag > 0.5) | (rebought & (share > 0)))
        gaps = pd.DataFrame({"i": h.indices, "gap": h.own_gap}).dropna()
        item_med = gaps.groupby("i")["gap"].median().reindex(range(n))
        cat_med = item_med.groupby(self.item_category).transform("median")
        overall = float(gaps["gap"].median()) if len(gaps) else 30.0
        self.item_cycle = item_med.fillna(cat_med).fillna(overall).to_numpy(dtype=np.float32)

    def _popularity(self, p: pd.DataFrame, members: pd.DataFrame | None) -> None:
        days = self.settings.recommend.popular_days
        assert self.cutoff is not None
        recent = p[p[C.TS] >= self.cutoff - days * DAY]
        before = p[(p[C.TS] < self.cutoff - days * DAY) & (p[C.TS] >= self.cutoff - 2 * days * DAY)]
        by = self.settings.recommend.cold_start_by
        group = pd.Series(dtype=object)
        if members is not None and by in members.columns:
            group = members.drop_duplicates(C.MEMBER_ID).set_index(C.MEMBER_ID)[by].dropna().astype(str)
        self.member_group = group

        def ranked(frame: pd.DataFrame, prev: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            buyers = frame.groupby(C.ITEM_ID)[C.MEMBER_ID].nunique()
            if buyers.empty:  # nothing in the window: the whole history
                buyers = p.groupby(C.ITEM_ID)[C.MEMBER_ID].nunique()
            buyers = buyers.sort_index().sort_values(ascending=False, kind="mergesort")
            codes = self.items.get_indexer(buyers.index)
            share = buyers.to_numpy(dtype=np.float64) / max(frame[C.MEMBER_ID].nunique(), 1)
            old = prev.groupby(C.ITEM_ID)[C.MEMBER_ID].nunique().reindex(buyers.index).fillna(0)
            growth = ((buyers + 1) / (old + 1))[buyers >= 3].sort_values(ascending=False, kind="mergesort")
            return codes, share, self.items.get_indexer(growth.index)

        self.popular[""], self.popular_share[""], self.trending[""] = ranked(recent, before)
        if len(group):
            g_recent = recent[C.MEMBER_ID].map(group)
            g_before = before[C.MEMBER_ID].map(group)
            for name in sorted(group.unique()):
                sub = recent[(g_recent == name).to_numpy()]
                if sub[C.MEMBER_ID].nunique() >= 20:  # a group too small has no list of its own
                    self.popular[name], self.popular_share[name], self.trending[name] = ranked(
                        sub, before[(g_before == name).to_numpy()])

    # --- scoring ------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if self.als is None or self.history is None:
            raise RuntimeError("the recommender is not fitted (fit or load it first)")

    def blocked(self, exclude_items: Iterable[str] = (), exclude_categories: Iterable[str] = (),
                categories: Iterable[str] | None = None) -> np.ndarray:
        """Item codes never to recommend: the settings' and call's exclusions, out of stock, and (with
        ``categories``) every item outside them."""
        rs = self.settings.recommend
        mask = np.zeros(len(self.items), dtype=bool)
        ex_items = set(map(str, exclude_items)) | self.out_of_stock()
        if ex_items:
            mask |= self.items.astype(str).isin(ex_items)
        ex_cat = set(map(str, exclude_categories)) | set(rs.exclude_categories)
        if ex_cat:
            mask |= np.isin(self.item_category, list(ex_cat))
        if categories is not None:
            mask |= ~np.isin(self.item_category, [str(c) for c in categories])
        return np.flatnonzero(mask).astype(np.int32)

    def out_of_stock(self) -> set[str]:
        path = self.settings.recommend.out_of_stock_file
        if path is None:
            return set()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recommend.out_of_stock_file {path} does not exist")
        return {ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}

    def _user_factors(self, history: History, rows: np.ndarray, member_ids: pd.Index) -> np.ndarray:
        """Stored factors for members the model knows with no purchase since the cutoff; recalculated from
        ``history`` for the others who have purchases there; zeros (no ALS) for members with none."""
        assert self.cutoff is not None
        f = np.zeros((len(rows), self.als.factors), dtype=np.float32)
        known = self.members.get_indexer(member_ids)
        has = rows >= 0
        fresh = np.zeros(len(rows), dtype=bool)
        if history is not self.history:
            fresh[has] = history.last_ts[rows[has]] >= self.cutoff.value
        fresh |= has & (known < 0)
        stored = (known >= 0) & ~fresh
        f[stored] = self.als.user_factors[known[stored]]
        if fresh.any():
            sub = history.confidence(self.params["weighting"])[rows[fresh]]
            f[fresh] = self.als.recalculate_user(np.arange(fresh.sum()), sub)
        return f

    def recommend(self, member_ids: Sequence[Any], n: int | None = None, history: History | None = None,
                  exclude_items: Iterable[str] = (), exclude_categories: Iterable[str] = (),
                  categories: Iterable[str] | None = None, max_per_category: int | None = None,
                  groups: dict[str, str] | None = None, explain: bool = False) -> pd.DataFrame:
        """Top ``n`` per member in ``member_ids`` (long frame, :class:`RC` columns, members in the given
        order, ranks 1..n). ``history`` (default: the one the model was fitted on) gives the purchases known
        now; members with purchases there since the cutoff have their ALS factors recalculated. A member
        with no purchases gets the popular items of their group (``groups`` or the members table seen at
        fit), flagged ``cold_start``. ``explain`` names the bought item behind each ALS pick (costs a
        solve per member)."""
        self._check_fitted()
        assert self.history is not None
        rs = self.settings.recommend
        n = rs.n if n is None else int(n)
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        cap = rs.max_per_category if max_per_category is None else int(max_per_category)
        history = history or self.history
        if not history.items.equals(self.items):
            raise ValueError("the history was built over another item index than the model's")
        ids = pd.Index(member_ids)
        rows = history.rows(ids)
        blocked = self.blocked(exclude_items, exclude_categories, categories)
        warm = np.flatnonzero(rows >= 0)
        parts = []
        if len(warm):
            parts.append(self._warm(history, rows[warm], ids[warm], warm, n, cap, blocked, explain))
        cold = np.flatnonzero(rows < 0)
        if len(cold):
            parts.append(self._cold(ids[cold], cold, n, cap, blocked, groups or {}))
        if not parts:
            return pd.DataFrame({c: [] for c in RC.COLUMNS})
        if len(parts) == 1 and parts[0]["_pos"].is_monotonic_increasing:  # one member, or all warm: in order
            return parts[0][list(RC.COLUMNS)]
        out = pd.concat(parts, ignore_index=True).sort_values(["_pos", RC.RANK], kind="mergesort")
        return out.drop(columns="_pos").reset_index(drop=True)[list(RC.COLUMNS)]

    def _warm(self, history: History, rows: np.ndarray, ids: pd.Index, pos: np.ndarray, n: int, cap: int,
              blocked: np.ndarray, explain: bool) -> pd.DataFrame:
        blend, due_from = float(self.params["blend"]), float(self.params["due_from"])
        u = self._user_factors(history, rows, ids)
        # own history: bought, replenishable, due, not blocked
        r_own, take = history.entries(rows)
        lens = np.diff(history.indptr)[rows]
        i_own = history.indices[take].astype(np.int64)
        gap = history.own_gap[take]
        cycle = np.where(np.isfinite(gap) & (gap > 0), gap, self.item_cycle[i_own])
        ratio = history.days_since[take] / np.maximum(cycle, 1e-6)
        ahead = (history.days_since[take] + self.settings.recommend.lookahead_days) / np.maximum(cycle, 1e-6)
        # affinity: purchase days of the item, the decayed count breaking ties, over the member's largest
        w = history.count[take] + 1e-3 * history.weight[take] / (1.0 + history.weight[take])
        top_w = np.maximum.reduceat(w, np.cumsum(lens) - lens) if len(w) else w  # every row has an item
        aff = w / np.repeat(top_w, lens)
        due = self.replenishable[i_own] & (ahead >= due_from)
        if len(blocked):
            due &= ~np.isin(i_own, blocked)
        r_own, i_own, aff, ratio, cycle = r_own[due], i_own[due], aff[due], ratio[due], cycle[due]
        timing = np.minimum(ahead[due], 1.0) ** float(self.params["due_power"])
        dot = np.einsum("ij,ij->i", u[r_own], self.als.item_factors[i_own])
        s_own = blend * aff * timing + (1.0 - blend) * dot
        # ALS picks score at most (1 - blend) |u| max|v| (Cauchy-Schwarz): a member whose n-th own candidate
        # beats that needs no ALS pass (exact; not with a category cap, which may skip own candidates)
        k = min(len(self.items), n * (3 if cap else 1))
        need = np.ones(len(rows), dtype=bool)
        if not cap and len(r_own) and self._prune:
            bound = (1.0 - blend) * np.linalg.norm(u, axis=1) * float(np.linalg.norm(self.als.item_factors,
                                                                                    axis=1).max())
            order = np.lexsort((-s_own, r_own))
            nth = _cumcount(r_own[order]) == n - 1
            beats = s_own[order][nth] > bound[r_own[order][nth]]
            need[r_own[order][nth][beats]] = False
        who = np.flatnonzero(need)
        r_als, i_als, s_als = self._als_top(u[who], history, rows[who], k, blocked)
        r_als, s_als = who[r_als], (1.0 - blend) * s_als
        r = np.concatenate([r_als, r_own])
        i = np.concatenate([i_als, i_own])
        score = np.concatenate([s_als, s_own]).astype(np.float64)
        own = np.concatenate([np.zeros(len(r_als), dtype=bool), np.ones(len(r_own), dtype=bool)])
        days = np.concatenate([np.zeros(len(r_als)), ratio * cycle])
        cyc = np.concatenate([np.zeros(len(r_als)), cycle])
        keep, rank = self._top_arrays(r, i, score, n, cap)
        r, i, score, own, days, cyc = r[keep], i[keep], score[keep], own[keep], days[keep], cyc[keep]
        because = self._because(history, rows, u, r, i, own) if explain else None
        return pd.DataFrame({"_pos": pos[r], RC.MEMBER_ID: ids[r], RC.RANK: rank, RC.ITEM_ID: self.items[i],
                             RC.SCORE: score, RC.SOURCE: np.where(own, SOURCE_OWN, SOURCE_ALS).astype(object),
                             RC.COLD_START: False, RC.BECAUSE: because if because is not None else [None] * len(r),
                             RC.REASON: self._reasons(because, own, days, cyc)})

    def _als_top(self, u: np.ndarray, history: History, rows: np.ndarray, k: int,
                 blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, item code, ALS score) of each member's best ``k`` items they never bought, blocked ones
        left out. implicit's top-k slices its per-query filter row by row (a CSR row each, ~0.1 ms: most
        of a batch pass at 1M members), so it runs here unfiltered with ``k`` plus the most items a member
        of the batch bought, members batched by how many they bought, and bought items are dropped after:
        the same top ``k``."""
        from implicit.cpu.topk import topk

        lens = np.diff(history.indptr)[rows]
        order = np.argsort(lens, kind="stable")
        out_r, out_i, out_s = [], [], []
        n_items = len(self.items)
        for lo in range(0, len(order), _TOPK_BATCH):
            who = order[lo: lo + _TOPK_BATCH]
            kk = min(n_items, k + int(lens[who].max()))
            ids, scores = topk(self.als.item_factors, u[who], kk, filter_items=blocked if len(blocked) else None,
                               num_threads=self.settings.recommend.num_threads)
            ids = ids.astype(np.int64)
            r_owned, take = history.entries(rows[who])
            owned_keys = r_owned.astype(np.int64) * n_items + history.indices[take]
            keys = np.arange(len(who))[:, None] * n_items + ids
            good = (ids >= 0) & (scores > -1e30) & ~np.isin(keys, owned_keys)
            good &= np.cumsum(good, axis=1) <= k
            rr, cc = np.nonzero(good)
            out_r.append(who[rr])
            out_i.append(ids[rr, cc])
            out_s.append(scores[rr, cc])
        if not out_r:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(out_r), np.concatenate(out_i), np.concatenate(out_s)

    def _top_arrays(self, r: np.ndarray, i: np.ndarray, score: np.ndarray, n: int,
                    cap: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions of each row-group's best ``n`` (score down, item code up on ties; at most ``cap`` a
        category when set), in that order, and their ranks 1..n."""
        order = np.lexsort((i, -score, r))
        if cap:
            cat_codes = pd.factorize(self.item_category)[0]
            key = r[order] * (int(cat_codes.max()) + 1) + cat_codes[i[order]]
            grouped = np.argsort(key, kind="stable")  # best first inside each member x category
            within = np.empty(len(order), dtype=np.int64)
            within[grouped] = _cumcount(key[grouped])
            order = order[within < cap]
        rank = _cumcount(r[order])
        take = rank < n
        return order[take], rank[take] + 1

    def _because(self, history: History, rows: np.ndarray, u: np.ndarray, r: np.ndarray, i: np.ndarray,
                 own: np.ndarray) -> list[Any]:
        conf = history.confidence(self.params["weighting"])
        out: list[Any] = [None] * len(r)
        weights: dict[int, Any] = {}
        for j in np.flatnonzero(~own):
            row = conf[[rows[r[j]]]]
            _, contrib, weights[r[j]] = self.als.explain(0, row, int(i[j]), user_weights=weights.get(r[j]), N=1)
            if contrib:
                out[j] = self.items[int(contrib[0][0])]
        return out

    def _name(self, item: Any) -> str:
        return self.item_names.get(str(item), str(item))

    def _reasons(self, because: Any, own: np.ndarray, days: np.ndarray, cycle: np.ndarray) -> np.ndarray:
        out = np.full(len(own), "liked by members who buy what you buy", dtype=object)
        j = np.flatnonzero(own)
        if 0 < len(j) <= 256:  # a few rows: plain strings beat two pandas string columns
            out[j] = [f"due again: bought about every {e} days, last {d} days ago"
                      for e, d in zip(np.rint(cycle[j]).astype(np.int64), np.rint(days[j]).astype(np.int64),
                                      strict=True)]
        elif len(j):
            every = pd.Series(np.rint(cycle[j]).astype(np.int64)).astype(str)
            last = pd.Series(np.rint(days[j]).astype(np.int64)).astype(str)
            out[j] = ("due again: bought about every " + every + " days, last " + last + " days ago").to_numpy()
        if because is not None:
            for j, item in enumerate(because):
                if item is not None:
                    out[j] = f"because you bought {self._name(item)}"
        return out

    def _cold(self, ids: pd.Index, pos: np.ndarray, n: int, cap: int, blocked: np.ndarray,
              groups: dict[str, str]) -> pd.DataFrame:
        by = self.settings.recommend.cold_start_by
        keys = []
        for member in ids:
            group = groups.get(str(member), self.member_group.get(member, ""))
            keys.append(group if group in self.popular else "")
        keys_arr = np.array(keys, dtype=object)
        cols: dict[str, list[np.ndarray]] = {c: [] for c in ("_pos", RC.MEMBER_ID, "i", RC.SCORE, RC.RANK, RC.REASON)}
        for key in sorted(set(keys)):
            codes, share = self.popular[key], self.popular_share[key]
            keep = ~np.isin(codes, blocked) if len(blocked) else np.ones(len(codes), dtype=bool)
            at, rank = self._top_arrays(np.zeros(int(keep.sum()), dtype=np.int64), codes[keep], share[keep], n, cap)
            who = np.flatnonzero(keys_arr == key)
            cols["_pos"].append(np.repeat(pos[who], len(at)))
            cols[RC.MEMBER_ID].append(np.repeat(np.asarray(ids[who], dtype=object), len(at)))
            cols["i"].append(np.tile(codes[keep][at], len(who)))
            cols[RC.SCORE].append(np.tile(share[keep][at], len(who)))
            cols[RC.RANK].append(np.tile(rank, len(who)))
            cols[RC.REASON].append(np.full(len(at) * len(who), f"popular in {by} {key}" if key else "popular now",
                                           dtype=object))
        out = {c: np.concatenate(v) for c, v in cols.items()}
        i = out.pop("i")
        return pd.DataFrame({**out, RC.ITEM_ID: self.items[i], RC.SOURCE: SOURCE_POPULAR, RC.BECAUSE: None,
                             RC.COLD_START: True})

    def trending_items(self, n: int = 10, group: str = "") -> list[Any]:
        """Items whose buyers grew most over the last ``popular_days`` against the ones before (at least 3
        buyers), for ``group`` (its own list when it has one, else everyone's)."""
        self._check_fitted()
        key = group if group in self.trending else ""
        return list(self.items[self.trending[key][:n]])

    def similar_items(self, item_id: Any, n: int = 10) -> pd.DataFrame:
        """Items nearest ``item_id`` in ALS's item factors (cosine), the item itself left out."""
        self._check_fitted()
        code = self.items.get_indexer([item_id])[0]
        if code < 0:
            raise KeyError(f"item {item_id!r} is not in the recommender (never bought before {self.cutoff})")
        ids, scores = self.als.similar_items(int(code), N=n + 1)
        keep = ids != code
        return pd.DataFrame({C.ITEM_ID: self.items[ids[keep][:n]], RC.SCORE: scores[keep][:n]})

    def fingerprint(self) -> str:
        from training.models import settings_fingerprint

        return settings_fingerprint(self.settings, {"kind": "recommend", "params": self.params})

    # --- persistence --------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One ``.npz`` file: factors, ID maps, item meta, history, popular lists and a JSON header with the
        parameters and settings fingerprint (written atomically)."""
        self._check_fitted()
        h = self.history
        assert h is not None and self.cutoff is not None
        from training.models import library_versions

        header = {"format": FORMAT, "params": self.params, "cutoff": self.cutoff.isoformat(),
                  "history_as_of": h.as_of.isoformat(), "item_names": self.item_names,
                  "groups": sorted(self.popular), "libraries": library_versions(),
                  "settings_fingerprint": self.fingerprint()}
        arrays: dict[str, np.ndarray] = {
            "items": self.items.astype(str).to_numpy(dtype="U"),
            "members": self.members.astype(str).to_numpy(dtype="U"),
            "item_category": self.item_category.astype("U"), "replenishable": self.replenishable,
            "item_cycle": self.item_cycle, "user_factors": self.als.user_factors,
            "item_factors": self.als.item_factors, "h_indptr": h.indptr, "h_indices": h.indices,
            "h_weight": h.weight, "h_days_since": h.days_since, "h_own_gap": h.own_gap, "h_count": h.count,
            "h_last_ts": h.last_ts,
            "group_members": self.member_group.index.astype(str).to_numpy(dtype="U"),
            "group_names": self.member_group.astype(str).to_numpy(dtype="U"),
            "header": np.array(json.dumps(header))}
        for j, g in enumerate(sorted(self.popular)):
            arrays[f"pop_{j}"] = self.popular[g]
            arrays[f"popshare_{j}"] = self.popular_share[g]
            arrays[f"trend_{j}"] = self.trending[g]
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path, settings: Settings | None = None) -> Recommender:
        """Load a saved recommender; a file of another format is an error naming it. Item and member ids come
        back as text."""
        from implicit.cpu.als import AlternatingLeastSquares

        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            header = json.loads(str(z["header"]))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not a saved recommender: {e}") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        rec = cls(settings, **header["params"])
        rec.cutoff = pd.Timestamp(header["cutoff"])
        rec.items = pd.Index(z["items"].astype(object))
        rec.members = pd.Index(z["members"].astype(object))
        rec.item_category = z["item_category"].astype(object)
        rec.replenishable = z["replenishable"]
        rec.item_cycle = z["item_cycle"]
        rec.item_names = header["item_names"]
        rec.member_group = pd.Series(z["group_names"].astype(object), index=z["group_members"].astype(object))
        for j, g in enumerate(header["groups"]):
            rec.popular[g], rec.popular_share[g], rec.trending[g] = z[f"pop_{j}"], z[f"popshare_{j}"], z[f"trend_{j}"]
        rec.history = History(as_of=pd.Timestamp(header["history_as_of"]), members=rec.members,
                              items=rec.items, indptr=z["h_indptr"], indices=z["h_indices"], weight=z["h_weight"],
                              days_since=z["h_days_since"], own_gap=z["h_own_gap"], count=z["h_count"],
                              last_ts=z["h_last_ts"])
        p = rec.params
        _threads()
        als = AlternatingLeastSquares(factors=int(p["factors"]), regularization=float(p["regularization"]),
                                      alpha=float(p["alpha"]), iterations=int(p["iterations"]),
                                      num_threads=rec.settings.recommend.num_threads)
        als.user_factors, als.item_factors = z["user_factors"], z["item_factors"]
        rec.als = als
        return rec
