"""The models the API answers with: every registered model at one alias, loaded together, swapped together.

:func:`load_champions` downloads ``churn``, ``next_purchase``, ``value`` and ``recommend`` at the alias from
the MLflow registry and loads their saved files (the native LightGBM boosters, predicting with one thread,
and the recommender's arrays), never the pyfunc wrappers (they answer class labels and use every core:
PITFALLS). Each model's features are checked against the feature service the API reads online, so a model
that needs a feature the online store does not serve fails at load, not at the first request.

:class:`ChampionWatcher` polls the alias and, when a version changes, loads the new set beside the old one and
swaps one reference: a request holds the :class:`Champions` it started with, so none is dropped or answered
by a half-loaded set. Rolling back is moving the alias back; the watcher picks that up the same way.

Example::

    champions = load_champions(settings)             # raises LookupError naming a missing alias
    champions.versions                               # {'churn': '3', 'next_purchase': '2', ...}
    watcher = ChampionWatcher(settings, champions, on_swap=lambda c: ...)
    watcher.start()                                  # a daemon thread; watcher.stop() ends it
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from features.settings import Settings
from training.basket import R, SimilarItems
from training.models import ChurnModel, LgbModel, ValueModel, load_model
from training.next_purchase import NextPurchaseModel
from training.recommend import Recommender
from training.tracking import (
    CHURN_MODEL,
    NEXT_PURCHASE_MODEL,
    PRIMARY_ARTIFACT,
    RECOMMEND_MODEL,
    VALUE_MODEL,
    alias_version,
    download_registered,
)

log = logging.getLogger(__name__)

SERVED_MODELS = (CHURN_MODEL, NEXT_PURCHASE_MODEL, VALUE_MODEL, RECOMMEND_MODEL)


class ChampionError(RuntimeError):
    """A registered model cannot be served (wrong kind, a feature the online store does not serve)."""


class RuleIndex:
    """Association rules grouped by antecedent, each group best first (confidence, lift, count), so
    completing a basket reads only the rules of its items instead of filtering the whole table."""

    def __init__(self, rules: pd.DataFrame) -> None:
        ordered = rules.sort_values([R.CONFIDENCE, R.LIFT, R.COUNT, R.ANTECEDENT],
                                    ascending=[False, False, False, True], kind="mergesort")
        self.size = len(ordered)
        self._groups: dict[str, list[tuple[str, float, float, int, float]]] = {}
        cols = [ordered[c].to_numpy() for c in (R.ANTECEDENT, R.CONSEQUENT, R.CONFIDENCE, R.LIFT, R.COUNT,
                                                R.SUPPORT)]
        for a, c, conf, lift, count, sup in zip(*cols, strict=True):
            self._groups.setdefault(str(a), []).append((str(c), float(conf), float(lift), int(count), float(sup)))

    def knows(self, label: str) -> bool:
        return label in self._groups

    def goes_with(self, basket: list[str], top: int) -> list[dict[str, Any]]:
        """What goes with ``basket``: the same answer as ``training.basket.goes_with`` (each consequent
        once, with its strongest rule, best first; nothing already in the basket)."""
        held = set(basket)
        best: dict[str, tuple[float, float, int, str, float]] = {}
        for a in held:
            for c, conf, lift, count, sup in self._groups.get(a, ()):
                if c in held:
                    continue
                key = (conf, lift, count)
                prev = best.get(c)
                # strongest rule; on a tie the antecedent that sorts first, as goes_with does
                if prev is None or key > prev[:3] or (key == prev[:3] and a < prev[3]):
                    best[c] = (conf, lift, count, a, sup)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], -kv[1][1], -kv[1][2], kv[1][3]))[:top]
        return [{"item_id": c, "because": a, "confidence": conf, "lift": lift, "count": count, "support": sup}
                for c, (conf, lift, count, a, sup) in ranked]


@dataclass(frozen=True)
class Champions:
    """One consistent set of served models and the registry versions they came from."""

    alias: str
    versions: dict[str, str]
    churn: ChurnModel
    next_purchase: NextPurchaseModel
    value: ValueModel
    recommender: Recommender
    rules: RuleIndex
    similar: SimilarItems
    loaded_at: datetime


def current_versions(settings: Settings, alias: str | None = None) -> dict[str, str | None]:
    """Registered model -> the version at ``alias`` now (None where the alias is not set)."""
    alias = alias or settings.serving.alias
    return {name: alias_version(settings, name, alias) for name in SERVED_MODELS}


def _check_features(model: LgbModel, served: set[str], name: str) -> None:
    missing = [f for f in model.features or () if f not in served]
    if missing:
        raise ChampionError(f"{name}: the model needs feature(s) {', '.join(missing)} that the online "
                            "feature service does not serve; retrain it on the current feature definitions")


def _lgb(settings: Settings, name: str, alias: str, kind: type[LgbModel], served: set[str],
         tmp: Path) -> tuple[str, LgbModel]:
    version, art = download_registered(settings, name, alias, dst=tmp / name)
    model = load_model(art / f"{PRIMARY_ARTIFACT}.json", settings=settings)
    if not isinstance(model, kind):
        raise ChampionError(f"{name}@{alias} (v{version}) holds a {type(model).__name__}, not a {kind.__name__}")
    _check_features(model, served, name)
    return version, model


def load_champions(settings: Settings, served_features: set[str], alias: str | None = None,
                   previous: Champions | None = None) -> Champions:
    """Every served model at ``alias`` (default ``settings.serving.alias``). Models whose version is the same
    as in ``previous`` are reused, not downloaded again. ``served_features``: the columns the online
    feature service returns."""
    alias = alias or settings.serving.alias
    wanted = current_versions(settings, alias)
    missing = [n for n, v in wanted.items() if v is None]
    if missing:
        raise LookupError(f"no {', '.join(f'{n}@{alias}' for n in missing)} in the registry at "
                          f"{settings.tracking_uri}: train and promote them (`repurchase train all`, then "
                          "`repurchase models promote NAME` for each)")
    keep = previous if previous is not None and previous.alias == alias else None
    versions: dict[str, str] = {}
    loaded: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="repurchase-champions-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, kind, attr in ((CHURN_MODEL, ChurnModel, "churn"),
                                 (NEXT_PURCHASE_MODEL, NextPurchaseModel, "next_purchase"),
                                 (VALUE_MODEL, ValueModel, "value")):
            if keep is not None and keep.versions.get(name) == wanted[name]:
                versions[name], loaded[attr] = wanted[name], getattr(keep, attr)
            else:
                versions[name], loaded[attr] = _lgb(settings, name, alias, kind, served_features, tmp)
        if keep is not None and keep.versions.get(RECOMMEND_MODEL) == wanted[RECOMMEND_MODEL]:
            versions[RECOMMEND_MODEL] = wanted[RECOMMEND_MODEL]  # type: ignore[assignment]
            loaded |= {"recommender": keep.recommender, "rules": keep.rules, "similar": keep.similar}
        else:
            version, art = download_registered(settings, RECOMMEND_MODEL, alias, dst=tmp / RECOMMEND_MODEL)
            versions[RECOMMEND_MODEL] = version
            loaded |= {"recommender": Recommender.load(art / "recommender.npz", settings=settings),
                       "rules": RuleIndex(pd.read_parquet(art / "rules.parquet")),
                       "similar": SimilarItems.load(art / "similar_items.npz")}
    return Champions(alias=alias, versions=versions, loaded_at=datetime.now(UTC), **loaded)


class ChampionWatcher:
    """Polls the alias every ``settings.serving.reload_interval_s`` and swaps to a new set when a version
    changes; ``on_tick`` runs after every poll (the service reloads its scores partition there). A failed
    load (a half-registered version, a model that does not fit the features) is logged and retried at the
    next poll; the service keeps answering with the set it has."""

    def __init__(self, settings: Settings, champions: Champions, served_features: set[str],
                 on_swap: Callable[[Champions], None], on_tick: Callable[[], None] | None = None) -> None:
        self.settings, self.champions, self.served = settings, champions, served_features
        self.on_swap, self.on_tick = on_swap, on_tick
        self.swaps = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """One poll: load and swap if a version moved. True when it swapped."""
        now = current_versions(self.settings, self.champions.alias)
        if now == self.champions.versions:
            return False
        fresh = load_champions(self.settings, self.served, self.champions.alias, previous=self.champions)
        old = self.champions.versions
        self.champions = fresh
        self.swaps += 1
        self.on_swap(fresh)
        log.info("swapped models at @%s: %s -> %s", fresh.alias, old, fresh.versions)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.settings.serving.reload_interval_s):
            try:
                self.check()
                if self.on_tick is not None:
                    self.on_tick()
                self.last_error = None
            except Exception as e:  # keep serving the loaded set; say why the new one is not used
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("could not load the models now at @%s (still serving %s): %s",
                            self.champions.alias, self.champions.versions, self.last_error)
