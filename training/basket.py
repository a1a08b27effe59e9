"""Basket associations: exact pair rules from sparse co-occurrence counts, and "what goes with these items".

A basket is one order: the distinct items (or categories, ``by="category"``) of its purchase lines; return
lines are left out. With ``X`` the baskets x items 0/1 matrix, ``X.T @ X`` holds every pair's basket count
exactly (integers, no sampling), so one sparse product gives what apriori finds level by level for
itemsets of two. A rule ``A -> B`` is kept when both sides and the pair reach ``min_count`` baskets and
``min_support``, and the rule reaches ``min_confidence`` and ``min_lift``. With ``n`` baskets and ``n_A``,
``n_B``, ``n_AB`` the counts:

- support ``n_AB / n``; antecedent and consequent support ``n_A / n``, ``n_B / n``;
- confidence ``n_AB / n_A`` = P(B in the basket | A in it); lift = confidence / support(B);
- leverage ``support - support(A) support(B)``; conviction ``(1 - support(B)) / (1 - confidence)``
  (infinite when the confidence is 1).

These are the definitions of mlxtend's ``association_rules``; ``tests/training/test_basket.py`` checks the
rules and values against mlxtend's apriori on the Online Retail file.

Example::

    lines = read_lake_table(settings, "transactions")
    baskets = Baskets.from_lines(lines)                     # or by="category" with an items table
    rules = association_rules(baskets, min_count=5, min_confidence=0.1)
    goes_with(rules, ["85123A", "22423"], top=5)           # consequents, best first, with the rule behind each
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.contract import C


class R:
    """Columns of a rules frame."""

    ANTECEDENT = "antecedent"
    CONSEQUENT = "consequent"
    ANTECEDENT_COUNT = "antecedent_count"
    CONSEQUENT_COUNT = "consequent_count"
    COUNT = "count"  # baskets holding both
    SUPPORT = "support"
    ANTECEDENT_SUPPORT = "antecedent_support"
    CONSEQUENT_SUPPORT = "consequent_support"
    CONFIDENCE = "confidence"
    LIFT = "lift"
    LEVERAGE = "leverage"
    CONVICTION = "conviction"
    COLUMNS = (ANTECEDENT, CONSEQUENT, ANTECEDENT_COUNT, CONSEQUENT_COUNT, COUNT, SUPPORT, ANTECEDENT_SUPPORT,
               CONSEQUENT_SUPPORT, CONFIDENCE, LIFT, LEVERAGE, CONVICTION)
    # goes_with
    ITEM = "item"
    BECAUSE = "because"


@dataclass(frozen=True)
class Baskets:
    """Baskets x labels 0/1 matrix (CSR, int32 ones), the labels (item ids or categories) and basket ids."""

    matrix: sp.csr_matrix
    labels: pd.Index
    baskets: pd.Index

    @property
    def n(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def from_lines(cls, lines: pd.DataFrame, by: Literal["item", "category"] = "item",
                   items: pd.DataFrame | None = None) -> Baskets:
        """Baskets of the purchase lines of ``lines`` (contract columns ``order_id``, ``item_id``,
        ``is_return``). ``by="category"`` maps items to their category through ``items`` (``item_id``,
        ``category``); an item missing there is an error naming it (nothing is dropped silently)."""
        need = [C.ORDER_ID, C.ITEM_ID] + ([C.IS_RETURN] if C.IS_RETURN in lines.columns else [])
        missing = [c for c in (C.ORDER_ID, C.ITEM_ID) if c not in lines.columns]
        if missing:
            raise KeyError(f"lines lack column(s) {', '.join(missing)}")
        frame = lines[need]
        if C.IS_RETURN in frame.columns:
            frame = frame[~frame[C.IS_RETURN].fillna(False).astype(bool)]
        for col in (C.ORDER_ID, C.ITEM_ID):
            if frame[col].isna().any():
                row = frame.index[frame[col].isna().to_numpy()][0]
                raise ValueError(f"lines: row {row}, column {col!r} is missing")
        keys = frame[C.ITEM_ID]
        if by == "category":
            if items is None or C.CATEGORY not in items.columns:
                raise ValueError("baskets by category need the items table (item_id, category)")
            category = items.drop_duplicates(C.ITEM_ID).set_index(C.ITEM_ID)[C.CATEGORY]
            keys = keys.map(category)
            if keys.isna().any():
                unknown = frame.loc[keys.isna(), C.ITEM_ID].drop_duplicates().head(5).tolist()
                raise ValueError(f"lines: item(s) {unknown} have no category in the items table")
        elif by != "item":
            raise ValueError(f"by must be 'item' or 'category', got {by!r}")
        b_codes, b_labels = pd.factorize(frame[C.ORDER_ID], sort=True)
        i_codes, i_labels = pd.factorize(keys, sort=True)
        m = sp.csr_matrix((np.ones(len(b_codes), dtype=np.int32), (b_codes, i_codes)),
                          shape=(len(b_labels), len(i_labels)))
        m.sum_duplicates()
        m.data[:] = 1  # an item twice in one basket counts once
        return cls(m, pd.Index(i_labels), pd.Index(b_labels))


def _frame(labels: pd.Index, a: np.ndarray, b: np.ndarray, n_a: np.ndarray, n_b: np.ndarray,
           n_ab: np.ndarray, n: int) -> pd.DataFrame:
    s_a, s_b, s_ab = n_a / n, n_b / n, n_ab / n
    conf = n_ab / n_a
    with np.errstate(divide="ignore"):
        conviction = np.where(conf < 1.0, (1.0 - s_b) / np.maximum(1.0 - conf, 0.0), np.inf)
    return pd.DataFrame({
        R.ANTECEDENT: labels[a], R.CONSEQUENT: labels[b], R.ANTECEDENT_COUNT: n_a, R.CONSEQUENT_COUNT: n_b,
        R.COUNT: n_ab, R.SUPPORT: s_ab, R.ANTECEDENT_SUPPORT: s_a, R.CONSEQUENT_SUPPORT: s_b,
        R.CONFIDENCE: conf, R.LIFT: conf / s_b, R.LEVERAGE: s_ab - s_a * s_b, R.CONVICTION: conviction})


def association_rules(baskets: Baskets, min_count: int = 5, min_support: float = 0.0,
                      min_confidence: float = 0.0, min_lift: float = 0.0) -> pd.DataFrame:
    """Every rule ``A -> B`` between two labels passing the guards (module docstring), sorted by lift, then
    count, then the labels (a stable order). Counts are exact. ``min_count`` is at least 1."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    n = baskets.n
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in R.COLUMNS})
    floor = max(min_count, int(np.ceil(min_support * n - 1e-9)))  # a pair's count bounds its sides' counts
    x = baskets.matrix
    counts = np.asarray(x.sum(axis=0)).ravel().astype(np.int64)
    keep = np.flatnonzero(counts >= floor)
    xk = x[:, keep]
    xk = xk[np.flatnonzero(np.diff(xk.indptr) >= 2)]  # baskets of one kept label make no pair
    co = sp.triu(xk.T.tocsr() @ xk, k=1).tocoo()
    frequent = co.data >= floor
    i, j, n_ij = keep[co.row[frequent]], keep[co.col[frequent]], co.data[frequent].astype(np.int64)
    a, b, n_ab = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([n_ij, n_ij])
    rules = _frame(baskets.labels, a, b, counts[a], counts[b], n_ab, n)
    rules = rules[(rules[R.CONFIDENCE] >= min_confidence) & (rules[R.LIFT] >= min_lift)]
    rules = rules.sort_values([R.LIFT, R.COUNT, R.ANTECEDENT, R.CONSEQUENT],
                              ascending=[False, False, True, True], kind="mergesort")
    return rules.reset_index(drop=True)


def goes_with(rules: pd.DataFrame, basket: Iterable[str], top: int = 10,
              exclude: Sequence[str] = ()) -> pd.DataFrame:
    """What goes with the labels in ``basket``: consequents of rules whose antecedent is in it, not already
    in it nor in ``exclude``, each once with its strongest rule (highest confidence, then lift), best first.
    Columns: item, because (the antecedent), and that rule's confidence, lift, count and support. Labels
    no rule knows give nothing (an empty frame, not an error: a basket of new items has no associations)."""
    held = set(map(str, basket))
    if top <= 0:
        raise ValueError(f"top must be positive, got {top}")
    hit = rules[rules[R.ANTECEDENT].astype(str).isin(held)
                & ~rules[R.CONSEQUENT].astype(str).isin(held | set(map(str, exclude)))]
    best = (hit.sort_values([R.CONFIDENCE, R.LIFT, R.COUNT, R.ANTECEDENT], ascending=[False, False, False, True],
                            kind="mergesort")
            .drop_duplicates(R.CONSEQUENT).head(top))
    return pd.DataFrame({R.ITEM: best[R.CONSEQUENT].to_numpy(), R.BECAUSE: best[R.ANTECEDENT].to_numpy(),
                         R.CONFIDENCE: best[R.CONFIDENCE].to_numpy(), R.LIFT: best[R.LIFT].to_numpy(),
                         R.COUNT: best[R.COUNT].to_numpy(), R.SUPPORT: best[R.SUPPORT].to_numpy()})


class SimilarItems:
    """Item-to-item neighbours from implicit ALS fitted on the baskets x items matrix (a basket is a user):
    items bought in the same baskets get close factors. ``similar`` ranks by cosine."""

    def __init__(self, factors: int = 32, iterations: int = 10, regularization: float = 0.05, seed: int = 7,
                 num_threads: int = 1) -> None:
        self.factors, self.iterations, self.regularization = factors, iterations, regularization
        self.seed, self.num_threads = seed, num_threads
        self.labels: pd.Index = pd.Index([])
        self.item_factors: np.ndarray | None = None

    def fit(self, baskets: Baskets) -> SimilarItems:
        from implicit.cpu.als import AlternatingLeastSquares

        from training.recommend import _threads

        _threads()
        als = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                      iterations=self.iterations, random_state=self.seed,
                                      num_threads=self.num_threads)
        als.fit(baskets.matrix.astype(np.float32), show_progress=False)
        self.labels, self.item_factors = baskets.labels, np.asarray(als.item_factors)
        return self

    def similar(self, label: str, n: int = 10) -> pd.DataFrame:
        """The ``n`` labels nearest ``label`` (item, score = cosine), itself left out; an unknown label is a
        KeyError naming it."""
        if self.item_factors is None:
            raise RuntimeError("SimilarItems is not fitted")
        code = self.labels.get_indexer([label])[0]
        if code < 0:
            raise KeyError(f"{label!r} is in no basket the similar-items model saw")
        f = self.item_factors
        norms = np.linalg.norm(f, axis=1)
        norms[norms == 0] = 1e-12
        cos = (f @ f[code]) / (norms * norms[code])
        cos[code] = -np.inf
        top = np.argsort(-cos, kind="stable")[:n]
        return pd.DataFrame({R.ITEM: self.labels[top], "score": cos[top]})

    def save(self, path: str | Path) -> Path:
        from features.lake import atomic_path

        if self.item_factors is None:
            raise RuntimeError("SimilarItems is not fitted")
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, labels=self.labels.astype(str).to_numpy(dtype="U"), item_factors=self.item_factors)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SimilarItems:
        z = np.load(Path(path), allow_pickle=False)
        out = cls(factors=z["item_factors"].shape[1])
        out.labels, out.item_factors = pd.Index(z["labels"].astype(object)), z["item_factors"]
        return out
