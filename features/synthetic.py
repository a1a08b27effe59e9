"""Seeded, realistic, vectorised demo data with a planted truth the models must recover.

``generate_demo_data(out_dir, members=...)`` writes raw files in the contract's column names::

    out_dir/transactions/part-00000.parquet ...   order lines, at most ~5M rows a part
    out_dir/members.parquet, items.parquet, campaigns.parquet
    out_dir/truth/members.parquet                 per member: dropout time, hazard and its inputs
    out_dir/truth/replenishment.parquet           per (member, replenishable category): the true cycle
    out_dir/truth/associations.parquet            planted category pairs and P(B in basket | A in basket)
    out_dir/truth/campaign_effects.parquet        per campaign (and pooled): uplift within 7/14/30 days
    out_dir/truth/seasonality.parquet             per day: the multiplier of the purchase rate
    out_dir/truth/truth.json                      parameters and a summary of all of the above

The world it simulates, in operational time (days since ``start``):

- Members join over the whole period with a growing trend (the join density rises linearly to three times
  its starting value), through the channels store / web / app / referral (the app's share grows). Member
  IDs are in join order. Some members never buy (more of them among web sign-ups).
- Each buyer places "random" orders as a Poisson process with a gamma-distributed rate (BG/NBD-like
  heterogeneity), modulated by a day multiplier (weekday pattern, a December peak, holiday spikes), and
  stops for good at a dropout time drawn from an exponential with a per-member hazard. The hazard rises
  for low-frequency members, members whose first order had a return ("early returners"), and deal seekers
  (who buy mostly with discounts and answer coupons twice as often); it falls for app and referral
  members; a log-normal frailty adds unobserved noise. Many members buy on the day they join.
- Some buyers replenish categories (formula ~21 days, diapers ~14, coffee ~28, pet food ~30, detergent
  ~35, shampoo ~42) on their own cycle (drawn around the category's) with a small jitter and an
  occasional skipped cycle, until they drop out. Their random orders never include a category they
  replenish, so their observed gaps in that category are their cycle.
- Basket lines come from a taste segment's category mix, a Zipf item popularity within the category, and
  a few favourite items per member. Planted pairs add the partner category to a basket that holds the
  trigger category (cake -> candles with P ~0.6, and a few more).
- Campaigns target a random share of the members who joined at least 14 days earlier, with a random
  holdout (20%). A treated buyer who is still active at the send answers with a planted probability by
  placing an extra order a few days later (gamma delay), paid partly with the coupon; the holdout gets
  nothing. The truth keeps the realised counterfactual: the treatment arm's purchase rate with and without
  its coupon orders, so ``uplift = rate(treatment) - rate(treatment without coupons)``.

Conventions of the files:

- IDs are strings: ``M0000001`` (join order), ``I00001``, ``O000000001``, ``CMP001``; wider when needed.
- Transaction lines are written in member order, then time; members in join order; campaign rows in
  member order within each block of members. Order IDs are unique but not chronological.
- Timestamps are UTC, microsecond precision; the time of day follows a shopping-hours profile.
- ``amount`` is the line total after discount; ``discount`` is >= 0.
- A return is a line with ``is_return`` true, negative quantity and amount, discount 0, the *same order
  id* as the purchase it returns (so the contract key (order_id, item_id, is_return) stays unique and the
  return is linked to its purchase) and its own, later ``ts`` (1-21 days after the purchase, before the
  member's dropout and the end of the period). Count orders from purchase lines only.
- "Purchase within W days of a send" (the campaign truth) means a purchase line with
  ``sent_at < ts <= sent_at + W days``.
- Members who never buy have ``dropout_at = joined_at`` and ``never_buys`` true in the truth.

Everything is vectorised numpy over blocks of a fixed number of members (``BLOCK_MEMBERS``); each block
draws from its own random stream derived from the seed and the block number, and world-level draws (the
catalogue, the join times, the campaigns) from streams of their own, so the files depend only on
(seed, members, start, days). Memory stays bounded by one block plus one parquet row group.

Example::

    from features.synthetic import generate_demo_data
    summary = generate_demo_data(Path("/tmp/demo"), members=5_000, seed=7)
    summary.lines, summary.paths["transactions"]
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import (
    ARM_HOLDOUT,
    ARM_TREATMENT,
    CAMPAIGNS,
    ITEMS,
    MEMBERS,
    TRANSACTIONS,
    C,
    Table,
)
from features.lake import atomic_path

logger = logging.getLogger(__name__)

BLOCK_MEMBERS = 32_768
"""Members simulated together; each block has its own random stream. Fixed: changing it changes the data."""
PART_MAX_ROWS = 5_000_000
"""A transactions part is closed before it would exceed this many rows."""
WINDOWS_DAYS = (7, 14, 30)
"""Windows after a campaign send over which the coupon effect is measured."""
HOLDOUT_SHARE = 0.2

TRANSACTIONS_DIR = "transactions"
TRUTH_DIR = "truth"
TRUTH_JSON = "truth.json"

_US_PER_DAY = 86_400_000_000
_TS_TYPE = pa.timestamp("us", tz="UTC")
_ARROW_TYPES = {"string": pa.string(), "timestamp": _TS_TYPE, "float": pa.float64(), "int": pa.int64(),
                "bool": pa.bool_()}


class T:
    """Column names of the truth tables (contract names where the column is a contract column)."""

    MEMBER_ID = C.MEMBER_ID
    CATEGORY = C.CATEGORY
    CAMPAIGN_ID = C.CAMPAIGN_ID
    SENT_AT = C.SENT_AT
    COUPON = C.COUPON
    COUPON_VALUE = C.COUPON_VALUE
    CHANNEL = C.CHANNEL
    JOINED_AT = C.JOINED_AT
    # members
    NEVER_BUYS = "never_buys"
    SEGMENT = "taste_segment"
    ORDER_RATE = "order_rate_per_day"  # random orders a day (gamma-distributed, before seasonality)
    EXPECTED_RATE = "expected_orders_per_day"  # order_rate + sum of 1/cycle over replenished categories
    EARLY_RETURNER = "early_returner"
    DEAL_SEEKER = "deal_seeker"
    FRAILTY = "frailty"
    HAZARD = "hazard_per_day"
    DROPOUT_AT = "dropout_at"
    DROPPED_OUT = "dropped_out_by_end"
    N_REPLENISHED = "n_replenished_categories"
    # replenishment
    CYCLE_DAYS = "cycle_days"
    FIRST_DUE_AT = "first_due_at"
    # associations
    ANTECEDENT = "antecedent_category"
    CONSEQUENT = "consequent_category"
    PLANTED_PROB = "planted_prob"
    BASKETS_ANTECEDENT = "baskets_with_antecedent"
    BASKETS_BOTH = "baskets_with_both"
    OBSERVED_PROB = "observed_prob"
    # campaign effects
    REDEEM_PROB = "redeem_prob"
    N_TREATMENT = "n_treatment"
    N_HOLDOUT = "n_holdout"
    # seasonality
    DATE = "date"
    MULTIPLIER = "multiplier"

    @staticmethod
    def rate_treatment(w: int) -> str:
        return f"rate_treatment_{w}d"

    @staticmethod
    def rate_treatment_without_coupon(w: int) -> str:
        return f"rate_treatment_without_coupon_{w}d"

    @staticmethod
    def rate_holdout(w: int) -> str:
        return f"rate_holdout_{w}d"

    @staticmethod
    def uplift_abs(w: int) -> str:
        return f"uplift_abs_{w}d"

    @staticmethod
    def uplift_rel(w: int) -> str:
        return f"uplift_rel_{w}d"


POOLED_CAMPAIGN = "ALL"
"""campaign_id of the pooled row of the campaign-effects truth."""


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate_demo_data`` wrote."""

    out_dir: Path
    seed: int
    members: int
    orders: int
    lines: int
    return_lines: int
    items: int
    campaign_rows: int
    start: str  # first day, ISO date
    end: str  # first day after the period, ISO date
    paths: dict[str, Path] = field(default_factory=dict)


# --- the world's parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Category:
    name: str
    weight: float  # relative share of random basket lines
    price_lo: float
    price_hi: float
    qty_extra: float = 0.15  # mean of the Poisson number of units beyond the first
    return_rate: float = 0.012  # chance that a purchase line is returned
    cycle_days: float = 0.0  # > 0: replenishable
    cycle_sd: float = 0.0
    replenisher_share: float = 0.0  # share of buyers who replenish it


_CATEGORIES: tuple[_Category, ...] = (
    _Category("baby_formula", 0.5, 18, 45, 0.5, 0.005, 21, 2.0, 0.06),
    _Category("diapers", 0.6, 9, 35, 0.4, 0.008, 14, 1.5, 0.07),
    _Category("coffee", 1.2, 5, 25, 0.3, 0.005, 28, 3.0, 0.14),
    _Category("pet_food", 0.8, 8, 60, 0.3, 0.008, 30, 3.0, 0.10),
    _Category("detergent", 0.8, 4, 20, 0.2, 0.005, 35, 4.0, 0.11),
    _Category("shampoo", 0.6, 3, 15, 0.2, 0.008, 42, 4.0, 0.08),
    _Category("cake", 1.2, 8, 45, 0.05, 0.01),
    _Category("candles", 0.04, 2, 12, 0.8, 0.01),
    _Category("party_supplies", 0.6, 2, 25, 0.6, 0.02),
    _Category("greeting_cards", 0.7, 2, 8, 0.2, 0.005),
    _Category("gift_wrap", 0.05, 2, 10, 0.5, 0.01),
    _Category("flowers", 0.6, 10, 60, 0.05, 0.01),
    _Category("chocolate", 1.2, 2, 15, 0.4, 0.005),
    _Category("toys", 1.5, 5, 80, 0.1, 0.04),
    _Category("video_games", 0.6, 20, 70, 0.05, 0.03),
    _Category("books", 1.2, 5, 40, 0.1, 0.02),
    _Category("stationery", 1.0, 1, 15, 0.5, 0.01),
    _Category("apparel", 2.5, 8, 90, 0.2, 0.08),
    _Category("shoes", 1.0, 25, 150, 0.02, 0.10),
    _Category("baby_clothes", 0.6, 5, 30, 0.3, 0.05),
    _Category("home_decor", 1.0, 5, 120, 0.1, 0.03),
    _Category("kitchenware", 1.0, 4, 80, 0.1, 0.02),
    _Category("bedding", 0.5, 15, 120, 0.05, 0.04),
    _Category("electronics", 0.8, 15, 400, 0.02, 0.05),
    _Category("phone_accessories", 1.0, 5, 40, 0.1, 0.04),
    _Category("beauty", 1.5, 4, 45, 0.2, 0.02),
    _Category("skincare", 1.0, 6, 60, 0.1, 0.02),
    _Category("fragrance", 0.4, 20, 110, 0.02, 0.03),
    _Category("jewelry", 0.3, 15, 200, 0.02, 0.06),
    _Category("sports", 0.8, 8, 120, 0.1, 0.04),
    _Category("outdoor", 0.5, 10, 200, 0.05, 0.04),
    _Category("garden", 0.6, 3, 60, 0.3, 0.02),
    _Category("tools", 0.6, 5, 150, 0.05, 0.03),
    _Category("snacks", 2.0, 1, 8, 0.5, 0.002),
    _Category("chips", 1.2, 1, 5, 0.4, 0.002),
    _Category("soda", 0.12, 1, 6, 0.8, 0.002),
    _Category("wine", 0.8, 6, 40, 0.3, 0.005),
    _Category("cheese", 0.10, 3, 15, 0.2, 0.005),
    _Category("beer", 0.7, 5, 25, 0.3, 0.003),
    _Category("pasta", 0.9, 1, 6, 0.5, 0.002),
    _Category("pasta_sauce", 0.10, 2, 7, 0.3, 0.002),
    _Category("bread", 1.5, 1, 6, 0.2, 0.002),
    _Category("fruit", 2.0, 1, 10, 0.6, 0.005),
    _Category("vegetables", 1.8, 1, 8, 0.6, 0.005),
    _Category("frozen", 1.2, 2, 12, 0.4, 0.003),
    _Category("tea", 0.7, 3, 20, 0.2, 0.005),
    _Category("baby_food", 0.4, 1, 6, 0.8, 0.005),
    _Category("pet_toys", 0.4, 3, 25, 0.2, 0.02),
    _Category("cleaning_tools", 0.5, 2, 25, 0.1, 0.02),
)

_PAIRS: tuple[tuple[str, str, float], ...] = (
    ("cake", "candles", 0.60),
    ("pasta", "pasta_sauce", 0.45),
    ("greeting_cards", "gift_wrap", 0.40),
    ("chips", "soda", 0.35),
    ("wine", "cheese", 0.30),
)
"""Planted basket pairs (A, B, q): a basket holding A gets B added with probability q when it lacks B."""

_CHANNELS = ("store", "web", "app", "referral")
_CHANNEL_NEVER_BUY = np.array([0.08, 0.25, 0.15, 0.10])
_CHANNEL_RATE = np.array([1.0, 0.85, 1.25, 1.1])
_CHANNEL_HAZARD = np.array([1.0, 1.25, 0.7, 0.6])
_CHANNEL_JOIN_PURCHASE = np.array([0.65, 0.35, 0.30, 0.45])
_REGIONS = ("north", "south", "east", "west", "central", "northeast", "northwest", "southwest")
_REGION_WEIGHTS = np.array([0.16, 0.18, 0.14, 0.15, 0.12, 0.09, 0.08, 0.08])
_GENDERS = ("F", "M", "X")

_JOIN_TREND = 2.0  # join density at the end of the period / at the start - 1
_N_SEGMENTS = 8
_N_FAVOURITES = 3
_FAVOURITE_SHARE = 0.2
_MEAN_ORDER_RATE = 1 / 40  # random orders a day, mean over buyers, before the channel multiplier
_RATE_SHAPE = 0.9
_BASE_HAZARD = 1 / 420
_HAZARD_FREQ_ELASTICITY = -0.5
_HAZARD_REF_RATE = 1 / 30
_HAZARD_EARLY_RETURN = math.log(1.8)
_HAZARD_DEAL_SEEKER = math.log(1.6)
_FRAILTY_SD = 0.3
_DEAL_SEEKER_SHARE = 0.12
_EARLY_RETURNER_SHARE = 0.06
_DISCOUNT_PROB = (0.07, 0.6)  # (ordinary member, deal seeker)
_DISCOUNT_RATES = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
_REPLENISH_JITTER = (0.8, 0.03)  # sd of a replenishment time = a + b * cycle (days)
_REPLENISH_SKIP = 0.03
_REPLENISH_LOYALTY = 0.85
_REPLENISH_EXTRA_LINES = 0.35
_RETURN_DELAY_DAYS = (1.0, 21.0)
_ITEMS_PER_MEMBER = 0.02
_MIN_ITEMS = 400
_MIN_ITEMS_PER_CATEGORY = 4
_ZIPF_EXPONENT = 1.1
_HOURLY = np.array([0.15, 0.08, 0.05, 0.04, 0.04, 0.08, 0.25, 0.5, 0.8, 1.0, 1.2, 1.35, 1.5, 1.4, 1.3, 1.25,
                    1.3, 1.45, 1.6, 1.65, 1.5, 1.1, 0.7, 0.35])
_WEEKDAY = np.array([0.9, 0.85, 0.9, 0.95, 1.1, 1.25, 1.05])  # Monday .. Sunday


@dataclass(frozen=True)
class _Campaign:
    frac: float  # where in the period it is sent
    coupon: str
    value: float
    target_share: float
    redeem_prob: float


_CAMPAIGN_PLAN = (
    _Campaign(0.18, "SAVE5", 5.0, 0.30, 0.15),
    _Campaign(0.32, "SAVE7", 7.5, 0.40, 0.20),
    _Campaign(0.46, "SAVE10", 10.0, 0.35, 0.25),
    _Campaign(0.60, "FREESHIP", 4.95, 0.50, 0.12),
    _Campaign(0.74, "SAVE5", 5.0, 0.30, 0.15),
    _Campaign(0.88, "SAVE10", 10.0, 0.40, 0.30),
)
_CAMPAIGN_MIN_TENURE_DAYS = 14.0
_CAMPAIGN_DEAL_SEEKER_FACTOR = 2.0
_CAMPAIGN_DELAY = (1.5, 3.0)  # gamma shape, scale (days) of the answer's delay
_CAMPAIGN_MAX_DELAY = 30.0

_KIND_RANDOM, _KIND_JOIN, _KIND_REPLENISH, _KIND_COUPON = 0, 1, 2, 3


# --- small vectorised helpers ----------------------------------------------------------------------------


def _arrow_schema(table: Table) -> pa.Schema:
    return pa.schema([pa.field(c.name, _ARROW_TYPES[c.dtype]) for c in table.columns])


def _width(prefix_min: int, largest: int) -> int:
    return max(prefix_min, len(str(largest)))


def _string_ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """``prefix`` + zero-padded ``numbers`` as an arrow string array, built without Python loops."""
    numbers = np.asarray(numbers, dtype=np.int64)
    if numbers.size and numbers.max() >= 10**width:
        raise ValueError(f"id {numbers.max()} does not fit in {width} digits after {prefix!r}")
    n = numbers.size
    head = np.frombuffer(prefix.encode("ascii"), dtype=np.uint8)
    length = head.size + width
    buf = np.empty((n, length), dtype=np.uint8)
    buf[:, : head.size] = head
    rest = numbers.copy()
    for k in range(length - 1, head.size - 1, -1):
        buf[:, k] = rest % 10 + 48
        rest //= 10
    offsets = np.arange(n + 1, dtype=np.int64) * length
    return pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(buf)]).cast(
        pa.string()
    )


def _labels(codes: np.ndarray, names: tuple[str, ...], null: np.ndarray | None = None) -> pa.Array:
    """Category codes -> arrow strings (nulls where ``null``)."""
    idx = pa.array(codes.astype(np.int32), mask=null)
    return pa.DictionaryArray.from_arrays(idx, pa.array(list(names), pa.string())).cast(pa.string())


def _timestamps(us: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(us, dtype=np.int64), type=pa.int64()).cast(_TS_TYPE)


def _segment_sizes(counts: np.ndarray) -> np.ndarray:
    """For groups of sizes ``counts`` laid out one after another: each element's position in its group."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def _flat_cumulative(weights: np.ndarray) -> np.ndarray:
    """Rows of ``weights`` as cumulative shares shifted by the row number, concatenated (see ``_draw``)."""
    cum = np.cumsum(weights, axis=1)
    cum = cum / cum[:, -1:]
    cum[:, -1] = 1.0
    return (cum + np.arange(weights.shape[0])[:, None]).ravel()


def _draw(flat: np.ndarray, rows: np.ndarray, rng: np.random.Generator, row_len: int | None) -> np.ndarray:
    """One draw per element of ``rows`` from that row's distribution in ``flat`` (``_flat_cumulative``).

    Returns the column index when ``row_len`` is given, else the position in ``flat``.
    """
    u = rng.random(rows.size) * (1.0 - 1e-9)
    pos = np.searchsorted(flat, rows + u, side="right")
    return pos - rows * row_len if row_len is not None else pos


# --- the world: catalogue, calendar, campaigns -----------------------------------------------------------


@dataclass
class _World:
    seed: int
    members: int
    days: int
    start_day: np.datetime64
    start_us: int
    cats: tuple[_Category, ...]
    cat_names: tuple[str, ...]
    repl_cats: np.ndarray  # category index of each replenishable category
    repl_bit: np.ndarray  # per category: bit of the replenishment mask, -1 if not replenishable
    cat_qty_extra: np.ndarray
    cat_return: np.ndarray
    # catalogue, in category order (position = item index)
    item_cat: np.ndarray
    item_price: np.ndarray
    item_number: np.ndarray  # the number in the item id
    item_flat: np.ndarray  # _flat_cumulative of the Zipf popularity within each category
    seg_weights: np.ndarray  # segments x categories
    seg_flat: np.ndarray
    seg_flat_nonrepl: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_q: np.ndarray
    # calendar
    day_mult: np.ndarray
    cum_mult: np.ndarray  # length days + 1
    hour_cdf: np.ndarray  # length 25
    # members
    join_op: np.ndarray  # per member (join order), operational days
    # campaigns
    send_op: np.ndarray
    send_us: np.ndarray
    widths: dict[str, int]

    @property
    def grid(self) -> np.ndarray:
        return np.arange(self.days + 1, dtype=np.float64)

    def warp(self, t: np.ndarray) -> np.ndarray:
        """Operational days -> calendar days: the time of day follows the shopping-hours profile."""
        day = np.floor(t)
        return day + np.interp(t - day, self.hour_cdf, np.linspace(0.0, 1.0, 25))

    def unwarp(self, x: np.ndarray) -> np.ndarray:
        day = np.floor(x)
        return day + np.interp(x - day, np.linspace(0.0, 1.0, 25), self.hour_cdf)

    def to_us(self, t_op: np.ndarray) -> np.ndarray:
        return self.start_us + np.round(self.warp(t_op) * _US_PER_DAY).astype(np.int64)

    def intensity(self, t: np.ndarray) -> np.ndarray:
        """Integrated day multiplier from 0 to ``t`` (operational days within the period)."""
        return np.interp(t, self.grid, self.cum_mult)

    def inverse_intensity(self, y: np.ndarray) -> np.ndarray:
        return np.interp(y, self.cum_mult, self.grid)


def _calendar(start_day: np.datetime64, days: int) -> np.ndarray:
    """Day multiplier of the purchase rate: weekday, December peak, January dip, holiday spikes."""
    dates = start_day + np.arange(days)
    epoch_day = dates.astype("datetime64[D]").astype(np.int64)
    dow = (epoch_day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    month_start = dates.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12 + 1
    dom = (dates - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    mult = _WEEKDAY[dow].copy()
    mult *= np.where(month == 12, 1.3, 1.0) * np.where(month == 1, 0.85, 1.0)
    mult *= np.where((month == 2) & ((dom == 13) | (dom == 14)), 1.6, 1.0)  # Valentine's
    second_sunday = (dow == 6) & (dom >= 8) & (dom <= 14)
    mothers_day = (month == 5) & (second_sunday | ((dow == 5) & (dom >= 7) & (dom <= 13)))
    mult *= np.where(mothers_day, 1.5, 1.0)  # the second Sunday of May and the Saturday before
    black_friday = (month == 11) & (dow == 4) & (dom >= 23) & (dom <= 29)
    mult *= np.where(black_friday, 2.5, 1.0)
    after_bf = np.zeros(days, dtype=bool)
    bf_idx = np.flatnonzero(black_friday)
    for k in (1, 2, 3):  # the weekend and Cyber Monday
        after_bf[bf_idx[bf_idx + k < days] + k] = True
    mult *= np.where(after_bf, 1.6, 1.0)
    mult *= np.where((month == 12) & (dom >= 18) & (dom <= 23), 1.5, 1.0)
    mult *= np.where((month == 12) & (dom == 25), 0.2, 1.0)
    mult *= np.where((month == 12) & (dom == 26), 1.4, 1.0)
    return mult


def _build_world(seed: int, members: int, start: str, days: int) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))  # catalogue and tastes
    cats = _CATEGORIES
    n_cat = len(cats)
    names = tuple(c.name for c in cats)
    weights = np.array([c.weight for c in cats])
    repl_cats = np.array([i for i, c in enumerate(cats) if c.cycle_days > 0])
    repl_bit = np.full(n_cat, -1)
    repl_bit[repl_cats] = np.arange(repl_cats.size)

    n_items_target = max(_MIN_ITEMS, round(members * _ITEMS_PER_MEMBER))
    per_cat = np.round(n_items_target * weights / weights.sum())
    per_cat = np.maximum(_MIN_ITEMS_PER_CATEGORY, per_cat).astype(np.int64)
    item_cat = np.repeat(np.arange(n_cat), per_cat)
    n_items = item_cat.size
    offsets = np.concatenate([[0], np.cumsum(per_cat)[:-1]])
    lo = np.log([c.price_lo for c in cats])[item_cat]
    hi = np.log([c.price_hi for c in cats])[item_cat]
    raw_price = np.exp(lo + rng.random(n_items) * (hi - lo))
    item_price = np.where(raw_price >= 3, np.round(raw_price) - 0.01, np.round(raw_price, 1) - 0.01)
    rank = _segment_sizes(per_cat) + 1
    pop = 1.0 / rank**_ZIPF_EXPONENT
    item_flat = np.empty(n_items)
    for c in range(n_cat):  # per category, not per member
        sl = slice(offsets[c], offsets[c] + per_cat[c])
        cum = np.cumsum(pop[sl])
        cum /= cum[-1]
        cum[-1] = 1.0
        item_flat[sl] = c + cum
    item_number = rng.permutation(n_items) + 1

    seg_weights = weights[None, :] * rng.gamma(1.0, 1.0, size=(_N_SEGMENTS, n_cat))
    nonrepl = seg_weights.copy()
    nonrepl[:, repl_cats] = 0.0
    index = {n: i for i, n in enumerate(names)}
    pair_a = np.array([index[a] for a, _, _ in _PAIRS])
    pair_b = np.array([index[b] for _, b, _ in _PAIRS])
    pair_q = np.array([q for _, _, q in _PAIRS])

    start_day = np.datetime64(start, "D")
    start_us = int(start_day.astype("datetime64[us]").astype(np.int64))
    day_mult = _calendar(start_day, days)
    cum_mult = np.concatenate([[0.0], np.cumsum(day_mult)])
    hour_cdf = np.concatenate([[0.0], np.cumsum(_HOURLY) / _HOURLY.sum()])
    hour_cdf[-1] = 1.0

    join_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    u = join_rng.random(members)
    g = _JOIN_TREND
    join_frac = (-1.0 + np.sqrt(1.0 + 2.0 * g * u * (1.0 + g / 2.0))) / g
    join_op = np.sort(join_frac * days)

    world = _World(
        seed=seed, members=members, days=days, start_day=start_day, start_us=start_us, cats=cats,
        cat_names=names, repl_cats=repl_cats, repl_bit=repl_bit,
        cat_qty_extra=np.array([c.qty_extra for c in cats]),
        cat_return=np.array([c.return_rate for c in cats]),
        item_cat=item_cat, item_price=item_price, item_number=item_number,
        item_flat=item_flat, seg_weights=seg_weights, seg_flat=_flat_cumulative(seg_weights),
        seg_flat_nonrepl=_flat_cumulative(nonrepl), pair_a=pair_a, pair_b=pair_b, pair_q=pair_q,
        day_mult=day_mult, cum_mult=cum_mult, hour_cdf=hour_cdf, join_op=join_op,
        send_op=np.empty(0), send_us=np.empty(0, dtype=np.int64),
        widths={"member": _width(7, members), "item": _width(5, n_items),
                "campaign": _width(3, len(_CAMPAIGN_PLAN))},
    )
    send_cal = np.array([math.floor(p.frac * days) + 10 / 24 for p in _CAMPAIGN_PLAN])
    world.send_op = world.unwarp(send_cal)
    world.send_us = start_us + np.round(send_cal * _US_PER_DAY).astype(np.int64)
    return world


# --- one block of members --------------------------------------------------------------------------------


@dataclass
class _Block:
    members: pa.Table
    transactions: pa.Table
    campaigns: pa.Table
    truth_members: pa.Table
    truth_replenishment: pa.Table
    n_orders: int
    n_returns: int
    pair_counts: np.ndarray  # pairs x (baskets with A, baskets with A and B)
    campaign_counts: np.ndarray  # campaigns x windows x (n_t, n_h, hits_t, hits_t_without_coupon, hits_h)


def _simulate_block(world: _World, block: int, lo: int, hi: int, order_offset: int) -> _Block:
    rng = np.random.default_rng(np.random.SeedSequence(world.seed, spawn_key=(2, block)))
    n = hi - lo
    days = float(world.days)
    gidx = np.arange(lo, hi, dtype=np.int64)
    join = world.join_op[lo:hi]
    frac = join / days

    # members and their traits
    p_chan = np.stack([0.50 - 0.15 * frac, np.full(n, 0.25), 0.12 + 0.15 * frac, np.full(n, 0.13)], axis=1)
    channel = (rng.random(n)[:, None] > np.cumsum(p_chan, axis=1)).sum(axis=1)
    channel = np.minimum(channel, len(_CHANNELS) - 1)
    buyer = rng.random(n) >= _CHANNEL_NEVER_BUY[channel]
    region = np.minimum(
        np.searchsorted(np.cumsum(_REGION_WEIGHTS) / _REGION_WEIGHTS.sum(), rng.random(n), side="right"),
        len(_REGIONS) - 1,
    )
    gender = np.minimum(np.searchsorted([0.52, 0.97], rng.random(n), side="right"), 2)
    gender_null = rng.random(n) < 0.05
    birth_year = np.clip(np.round(rng.normal(1982, 13, n)), 1930, 2007).astype(np.int64)
    birth_null = rng.random(n) < 0.07
    segment = rng.integers(0, _N_SEGMENTS, n)
    deal = rng.random(n) < _DEAL_SEEKER_SHARE
    early_ret = buyer & (rng.random(n) < _EARLY_RETURNER_SHARE)
    basket_mean = 1.0 + rng.gamma(2.0, 0.75, n)
    rate = rng.gamma(_RATE_SHAPE, _MEAN_ORDER_RATE / _RATE_SHAPE, n) * _CHANNEL_RATE[channel]
    rate = np.clip(rate, 1e-4, 0.5)
    join_purchase = buyer & (rng.random(n) < _CHANNEL_JOIN_PURCHASE[channel])
    fav_seg = np.repeat(segment, _N_FAVOURITES)
    fav_cat = _draw(world.seg_flat_nonrepl, fav_seg, rng, len(world.cats))
    favourites = _draw(world.item_flat, fav_cat, rng, None).reshape(n, _N_FAVOURITES)

    # replenishment pairs
    n_repl = world.repl_cats.size
    share = np.array([world.cats[c].replenisher_share for c in world.repl_cats])
    repl = buyer[:, None] & (rng.random((n, n_repl)) < share[None, :])
    mu = np.array([world.cats[c].cycle_days for c in world.repl_cats])
    sd = np.array([world.cats[c].cycle_sd for c in world.repl_cats])
    cycles = np.clip(rng.normal(mu, sd, (n, n_repl)), 0.6 * mu, 1.4 * mu)
    repl_mask = (repl.astype(np.int64) << np.arange(n_repl)).sum(axis=1)

    # dropout
    expected_rate = np.where(buyer, rate + (repl / cycles).sum(axis=1), 0.0)
    frailty = np.exp(rng.normal(0.0, _FRAILTY_SD, n))
    hazard = (_BASE_HAZARD * _CHANNEL_HAZARD[channel]
              * (np.maximum(expected_rate, 1e-4) / _HAZARD_REF_RATE) ** _HAZARD_FREQ_ELASTICITY
              * np.exp(_HAZARD_EARLY_RETURN * early_ret + _HAZARD_DEAL_SEEKER * deal) * frailty)
    life = rng.exponential(1.0, n) / hazard
    dropout = np.where(buyer, join + 0.01 + life, join)
    alive_end = np.minimum(dropout, days)

    # orders: random (seasonal Poisson), on joining, replenishment, coupon answers
    lam_lo = world.intensity(join)
    lam_hi = world.intensity(np.maximum(alive_end, join))
    n_rand = rng.poisson(np.where(buyer, rate * (lam_hi - lam_lo), 0.0))
    r_member = np.repeat(np.arange(n), n_rand)
    r_t = world.inverse_intensity(rng.uniform(lam_lo[r_member], lam_hi[r_member]))
    r_t = np.maximum(r_t, join[r_member])

    j_member = np.flatnonzero(join_purchase & (join + 0.003 < days))
    j_t = join[j_member] + 0.003

    p_member, p_bit = np.nonzero(repl)
    p_cycle = cycles[p_member, p_bit]
    p_first = join[p_member] + rng.random(p_member.size) * p_cycle
    p_count = np.where(p_first < alive_end[p_member],
                       np.floor((alive_end[p_member] - p_first) / p_cycle).astype(np.int64) + 1, 0)
    p_count = np.maximum(p_count, 0)
    pair_of = np.repeat(np.arange(p_member.size), p_count)
    k = _segment_sizes(p_count)
    jitter_sd = _REPLENISH_JITTER[0] + _REPLENISH_JITTER[1] * p_cycle[pair_of]
    q_t = p_first[pair_of] + k * p_cycle[pair_of] + rng.normal(0.0, 1.0, pair_of.size) * jitter_sd
    q_member = p_member[pair_of]
    keep = ((q_t >= join[q_member]) & (q_t < alive_end[q_member])
            & (rng.random(pair_of.size) >= _REPLENISH_SKIP))
    q_t, q_member, q_pair = q_t[keep], q_member[keep], pair_of[keep]
    # loyal item per pair
    p_cat = world.repl_cats[p_bit]
    p_loyal = _draw(world.item_flat, p_cat, rng, None)

    n_camp = len(_CAMPAIGN_PLAN)
    camp_rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    c_member_parts, c_t_parts, c_camp_parts = [], [], []
    for ci, plan in enumerate(_CAMPAIGN_PLAN):  # a handful of campaigns, each vectorised over members
        send = world.send_op[ci]
        eligible = join < send - _CAMPAIGN_MIN_TENURE_DAYS
        target = eligible & (rng.random(n) < plan.target_share)
        holdout = rng.random(n) < HOLDOUT_SHARE
        members_c = np.flatnonzero(target)
        camp_rows.append((ci, members_c, holdout[members_c]))
        p_answer = np.minimum(1.0, plan.redeem_prob * np.where(deal, _CAMPAIGN_DEAL_SEEKER_FACTOR, 1.0))
        answer = target & ~holdout & buyer & (dropout > send) & (rng.random(n) < p_answer)
        delay = rng.gamma(_CAMPAIGN_DELAY[0], _CAMPAIGN_DELAY[1], n)
        t_answer = send + delay
        answer &= (delay < _CAMPAIGN_MAX_DELAY) & (t_answer < alive_end)
        idx = np.flatnonzero(answer)
        c_member_parts.append(idx)
        c_t_parts.append(t_answer[idx])
        c_camp_parts.append(np.full(idx.size, ci))
    c_member = np.concatenate(c_member_parts)
    c_t = np.concatenate(c_t_parts)
    c_camp = np.concatenate(c_camp_parts)

    o_member = np.concatenate([r_member, j_member, q_member, c_member])
    o_t = np.concatenate([r_t, j_t, q_t, c_t])
    o_kind = np.concatenate([np.full(r_member.size, _KIND_RANDOM), np.full(j_member.size, _KIND_JOIN),
                             np.full(q_member.size, _KIND_REPLENISH), np.full(c_member.size, _KIND_COUPON)])
    o_extra = np.concatenate([np.full(r_member.size + j_member.size, -1), q_pair, c_camp])
    order = np.lexsort((o_t, o_member))
    o_member, o_t, o_kind, o_extra = o_member[order], o_t[order], o_kind[order], o_extra[order]
    n_orders = o_member.size
    o_us = world.to_us(o_t)

    # lines: random lines per order, replenishment lines, planted pairs
    is_repl_order = o_kind == _KIND_REPLENISH
    n_lines = np.where(is_repl_order, rng.poisson(_REPLENISH_EXTRA_LINES, n_orders),
                       1 + rng.poisson(basket_mean[o_member] - 1.0))
    l_order = np.repeat(np.arange(n_orders), n_lines)
    l_member = o_member[l_order]
    use_fav = rng.random(l_order.size) < _FAVOURITE_SHARE
    l_cat = _draw(world.seg_flat, segment[l_member], rng, len(world.cats))
    bit = world.repl_bit[l_cat]
    clash = (bit >= 0) & (((repl_mask[l_member] >> np.maximum(bit, 0)) & 1) == 1)
    l_cat[clash] = _draw(world.seg_flat_nonrepl, segment[l_member[clash]], rng, len(world.cats))
    l_item = _draw(world.item_flat, l_cat, rng, None)
    fav_pick = favourites[l_member, rng.integers(0, _N_FAVOURITES, l_order.size)]
    l_item = np.where(use_fav, fav_pick, l_item)

    repl_orders = np.flatnonzero(is_repl_order)
    rp = o_extra[repl_orders]
    loyal = rng.random(rp.size) < _REPLENISH_LOYALTY
    other = _draw(world.item_flat, p_cat[rp], rng, None)
    l_order = np.concatenate([l_order, repl_orders])
    l_item = np.concatenate([l_item, np.where(loyal, p_loyal[rp], other)])

    item_cat = world.item_cat
    pair_counts = np.zeros((world.pair_a.size, 2), dtype=np.int64)
    add_orders, add_items = [], []
    line_cat = item_cat[l_item]
    for pi in range(world.pair_a.size):  # a handful of planted pairs
        has_a = np.zeros(n_orders, dtype=bool)
        has_a[l_order[line_cat == world.pair_a[pi]]] = True
        has_b = np.zeros(n_orders, dtype=bool)
        has_b[l_order[line_cat == world.pair_b[pi]]] = True
        add = np.flatnonzero(has_a & ~has_b & (rng.random(n_orders) < world.pair_q[pi]))
        add_orders.append(add)
        add_items.append(_draw(world.item_flat, np.full(add.size, world.pair_b[pi]), rng, None))
        pair_counts[pi] = (has_a.sum(), (has_a & has_b).sum() + add.size)
    l_order = np.concatenate([l_order, *add_orders])
    l_item = np.concatenate([l_item, *add_items])
    l_qty = 1 + rng.poisson(world.cat_qty_extra[item_cat[l_item]])

    # merge repeated items of one order into one line
    srt = np.lexsort((l_item, l_order))
    l_order, l_item, l_qty = l_order[srt], l_item[srt], l_qty[srt]
    first = np.ones(l_order.size, dtype=bool)
    first[1:] = (l_order[1:] != l_order[:-1]) | (l_item[1:] != l_item[:-1])
    starts = np.flatnonzero(first)
    l_qty = np.add.reduceat(l_qty, starts).astype(np.float64) if starts.size else l_qty.astype(np.float64)
    l_order, l_item = l_order[starts], l_item[starts]
    l_member = o_member[l_order]
    l_cat = item_cat[l_item]

    # money
    gross = world.item_price[l_item] * l_qty
    p_disc = np.where(deal[l_member], _DISCOUNT_PROB[1], _DISCOUNT_PROB[0])
    disc_rate = np.where(rng.random(l_order.size) < p_disc,
                         _DISCOUNT_RATES[rng.integers(0, _DISCOUNT_RATES.size, l_order.size)], 0.0)
    discount = gross * disc_rate
    coupon_line = o_kind[l_order] == _KIND_COUPON
    if coupon_line.any():
        values = np.array([p.value for p in _CAMPAIGN_PLAN])
        order_gross = np.bincount(l_order[coupon_line], weights=gross[coupon_line], minlength=n_orders)
        cl = np.flatnonzero(coupon_line)
        share_c = np.minimum(1.0, values[o_extra[l_order[cl]]] / order_gross[l_order[cl]])
        discount[cl] = gross[cl] * share_c
    discount = np.round(discount, 2)
    amount = np.round(gross - discount, 2)

    # returns: random by category, plus one line of each early returner's first order
    ret = rng.random(l_order.size) < world.cat_return[l_cat]
    first_order_of_member = np.full(n, -1)
    first_order_of_member[o_member[::-1]] = np.arange(n_orders)[::-1]
    fo = first_order_of_member[early_ret & (first_order_of_member >= 0)]
    first_line_of_order = np.full(n_orders, -1)
    first_line_of_order[l_order[::-1]] = np.arange(l_order.size)[::-1]
    ret[first_line_of_order[fo]] = True
    ret_delay = rng.uniform(_RETURN_DELAY_DAYS[0], _RETURN_DELAY_DAYS[1], l_order.size)
    ret_t = o_t[l_order] + ret_delay
    ret &= (ret_t < alive_end[l_member]) & (amount > 0)  # a line paid in full by a coupon is not refunded
    rl = np.flatnonzero(ret)

    all_order = np.concatenate([l_order, l_order[rl]])
    all_item = np.concatenate([l_item, l_item[rl]])
    all_us = np.concatenate([o_us[l_order], world.to_us(ret_t[rl])])
    all_qty = np.concatenate([l_qty, -l_qty[rl]])
    all_amount = np.concatenate([amount, -amount[rl]])
    all_discount = np.concatenate([discount, np.zeros(rl.size)])
    all_ret = np.concatenate([np.zeros(l_order.size, dtype=bool), np.ones(rl.size, dtype=bool)])
    all_member = o_member[all_order]
    srt = np.lexsort((all_ret, all_item, all_us, all_member))
    tx_cols = {
        C.MEMBER_ID: _string_ids("M", gidx[all_member[srt]] + 1, world.widths["member"]),
        C.ORDER_ID: _string_ids("O", order_offset + all_order[srt] + 1, 9),
        C.TS: _timestamps(all_us[srt]),
        C.ITEM_ID: _string_ids("I", world.item_number[all_item[srt]], world.widths["item"]),
        C.CATEGORY: _labels(item_cat[all_item[srt]], world.cat_names),
        C.QUANTITY: pa.array(all_qty[srt], pa.float64()),
        C.AMOUNT: pa.array(all_amount[srt], pa.float64()),
        C.DISCOUNT: pa.array(all_discount[srt], pa.float64()),
        C.IS_RETURN: pa.array(all_ret[srt], pa.bool_()),
    }
    transactions = pa.table([tx_cols[c] for c in TRANSACTIONS.names], schema=_arrow_schema(TRANSACTIONS))

    join_us = world.to_us(join)
    member_cols = {
        C.MEMBER_ID: _string_ids("M", gidx + 1, world.widths["member"]),
        C.JOINED_AT: _timestamps(join_us),
        C.CHANNEL: _labels(channel, _CHANNELS),
        C.BIRTH_YEAR: pa.array(birth_year, pa.int64(), mask=birth_null),
        C.GENDER: _labels(gender, _GENDERS, gender_null),
        C.REGION: _labels(region, _REGIONS),
    }
    members_t = pa.table([member_cols[c] for c in MEMBERS.names], schema=_arrow_schema(MEMBERS))

    # campaigns and their realised effect
    campaign_counts = np.zeros((n_camp, len(WINDOWS_DAYS), 5), dtype=np.int64)
    c_member_col, c_arm, c_camp_col = [], [], []
    for ci, members_c, hold in camp_rows:
        c_member_col.append(members_c)
        c_arm.append(hold)
        c_camp_col.append(np.full(members_c.size, ci))
        own_coupon = (o_kind == _KIND_COUPON) & (o_extra == ci)
        sent = world.send_us[ci]
        for wi, w in enumerate(WINDOWS_DAYS):
            in_window = (o_us > sent) & (o_us <= sent + w * _US_PER_DAY)
            hits = np.bincount(o_member[in_window], minlength=n)[members_c] > 0
            hits_wo = np.bincount(o_member[in_window & ~own_coupon], minlength=n)[members_c] > 0
            campaign_counts[ci, wi] = ((~hold).sum(), hold.sum(), (hits & ~hold).sum(),
                                       (hits_wo & ~hold).sum(), (hits & hold).sum())
    cm = np.concatenate(c_member_col)
    ch = np.concatenate(c_arm)
    cc = np.concatenate(c_camp_col)
    coupons = tuple(p.coupon for p in _CAMPAIGN_PLAN)
    values = np.array([p.value for p in _CAMPAIGN_PLAN])
    camp_cols = {
        C.CAMPAIGN_ID: _string_ids("CMP", cc + 1, world.widths["campaign"]),
        C.MEMBER_ID: _string_ids("M", gidx[cm] + 1, world.widths["member"]),
        C.ARM: _labels(ch.astype(np.int64), (ARM_TREATMENT, ARM_HOLDOUT)),
        C.SENT_AT: _timestamps(world.send_us[cc]),
        C.COUPON: _labels(cc, coupons, ch),
        C.COUPON_VALUE: pa.array(values[cc], pa.float64(), mask=ch),
    }
    campaigns_t = pa.table([camp_cols[c] for c in CAMPAIGNS.names], schema=_arrow_schema(CAMPAIGNS))

    truth_members = pa.table({
        T.MEMBER_ID: member_cols[C.MEMBER_ID],
        T.JOINED_AT: member_cols[C.JOINED_AT],
        T.CHANNEL: member_cols[C.CHANNEL],
        T.NEVER_BUYS: pa.array(~buyer),
        T.SEGMENT: pa.array(segment.astype(np.int64)),
        T.ORDER_RATE: pa.array(np.where(buyer, rate, 0.0)),
        T.EXPECTED_RATE: pa.array(expected_rate),
        T.N_REPLENISHED: pa.array(repl.sum(axis=1).astype(np.int64)),
        T.EARLY_RETURNER: pa.array(early_ret),
        T.DEAL_SEEKER: pa.array(deal),
        T.FRAILTY: pa.array(frailty),
        T.HAZARD: pa.array(hazard),
        T.DROPOUT_AT: _timestamps(world.to_us(dropout)),
        T.DROPPED_OUT: pa.array(dropout < days),
    })
    truth_repl = pa.table({
        T.MEMBER_ID: _string_ids("M", gidx[p_member] + 1, world.widths["member"]),
        T.CATEGORY: _labels(p_cat, world.cat_names),
        T.CYCLE_DAYS: pa.array(p_cycle),
        T.FIRST_DUE_AT: _timestamps(world.to_us(p_first)),
    })
    return _Block(members_t, transactions, campaigns_t, truth_members, truth_repl, n_orders, int(rl.size),
                  pair_counts, campaign_counts)


# --- writing ---------------------------------------------------------------------------------------------


def _write_table(table: pa.Table, path: Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _items_table(world: _World) -> pa.Table:
    order = np.argsort(world.item_number)
    names = [f"{world.cat_names[c].replace('_', ' ')} #{r}"
             for c, r in zip(world.item_cat[order], (_segment_sizes(np.bincount(world.item_cat)) + 1)[order],
                             strict=True)]
    cols = {
        C.ITEM_ID: _string_ids("I", world.item_number[order], world.widths["item"]),
        C.CATEGORY: _labels(world.item_cat[order], world.cat_names),
        C.PRICE: pa.array(world.item_price[order], pa.float64()),
        C.REPLENISHABLE: pa.array(world.repl_bit[world.item_cat[order]] >= 0),
        C.ITEM_NAME: pa.array(names, pa.string()),
    }
    return pa.table([cols[c] for c in ITEMS.names], schema=_arrow_schema(ITEMS))


def _effects_table(world: _World, counts: np.ndarray) -> pa.Table:
    """Campaign-effect truth from the summed counts (campaigns x windows x 5), with a pooled row."""
    all_counts = np.concatenate([counts, counts.sum(axis=0, keepdims=True)])
    n_rows = all_counts.shape[0]
    plan = _CAMPAIGN_PLAN
    ids = [f"CMP{i + 1:0{world.widths['campaign']}d}" for i in range(len(plan))] + [POOLED_CAMPAIGN]
    cols: dict[str, pa.Array] = {
        T.CAMPAIGN_ID: pa.array(ids, pa.string()),
        T.SENT_AT: pa.array([*world.send_us.tolist(), None], pa.int64()).cast(_TS_TYPE),
        T.COUPON: pa.array([p.coupon for p in plan] + [None], pa.string()),
        T.COUPON_VALUE: pa.array([p.value for p in plan] + [None], pa.float64()),
        T.REDEEM_PROB: pa.array([p.redeem_prob for p in plan] + [None], pa.float64()),
        T.N_TREATMENT: pa.array(all_counts[:, 0, 0]),
        T.N_HOLDOUT: pa.array(all_counts[:, 0, 1]),
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        for wi, w in enumerate(WINDOWS_DAYS):
            n_t, n_h, hit_t, hit_wo, hit_h = (all_counts[:, wi, j].astype(np.float64) for j in range(5))
            rate_t, rate_wo, rate_h = hit_t / n_t, hit_wo / n_t, hit_h / n_h
            cols[T.rate_treatment(w)] = pa.array(rate_t)
            cols[T.rate_treatment_without_coupon(w)] = pa.array(rate_wo)
            cols[T.rate_holdout(w)] = pa.array(rate_h)
            cols[T.uplift_abs(w)] = pa.array(rate_t - rate_wo)
            cols[T.uplift_rel(w)] = pa.array((rate_t - rate_wo) / rate_wo)
    assert all(len(v) == n_rows for v in cols.values())
    return pa.table(cols)


def _check_args(members: int, days: int, start: str) -> None:
    if not isinstance(members, int | np.integer) or members <= 0:
        raise ValueError(f"members must be a positive integer, got {members!r}")
    if not isinstance(days, int | np.integer) or days < 60:
        raise ValueError(f"days must be an integer of at least 60 (campaign windows need room), got {days!r}")
    try:
        np.datetime64(start, "D")
    except ValueError as exc:
        raise ValueError(f"start must be an ISO date such as '2023-01-01', got {start!r}") from exc


def generate_demo_data(
    out_dir: Path,
    members: int,
    seed: int = 7,
    start: str = "2023-01-01",
    days: int = 730,
    progress: Callable[[str], None] | None = None,
) -> DemoSummary:
    """Simulate ``members`` members over ``days`` days from ``start`` and write the raw files and the truth.

    Same arguments, same files. ``progress`` is called with a short line after each block of members.
    See the module docstring for the layout, the simulated world and the file conventions.
    """
    _check_args(members, days, start)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = _build_world(seed, members, start, days)
    n_blocks = math.ceil(members / BLOCK_MEMBERS)
    logger.info("generating demo data: %d members, %d days from %s, seed %d, %d blocks", members, days,
                start, seed, n_blocks)
    paths: dict[str, Path] = {}
    paths["items"] = _write_table(_items_table(world), out_dir / "items.parquet")

    n_orders = n_lines = n_returns = n_campaign_rows = 0
    pair_counts = np.zeros((world.pair_a.size, 2), dtype=np.int64)
    campaign_counts = np.zeros((len(_CAMPAIGN_PLAN), len(WINDOWS_DAYS), 5), dtype=np.int64)
    tx_schema = _arrow_schema(TRANSACTIONS)
    with ExitStack() as stack:
        tx_dir = stack.enter_context(atomic_path(out_dir / TRANSACTIONS_DIR))
        truth_dir = stack.enter_context(atomic_path(out_dir / TRUTH_DIR))
        tx_dir.mkdir()
        truth_dir.mkdir()
        members_tmp = stack.enter_context(atomic_path(out_dir / "members.parquet"))
        campaigns_tmp = stack.enter_context(atomic_path(out_dir / "campaigns.parquet"))
        w_members = stack.enter_context(pq.ParquetWriter(members_tmp, _arrow_schema(MEMBERS)))
        w_campaigns = stack.enter_context(pq.ParquetWriter(campaigns_tmp, _arrow_schema(CAMPAIGNS)))
        w_truth_members: pq.ParquetWriter | None = None
        w_truth_repl: pq.ParquetWriter | None = None
        part_writers: list[pq.ParquetWriter] = []
        stack.callback(lambda: [w.close() for w in part_writers if w.is_open])
        part_rows = 0
        for block in range(n_blocks):
            lo, hi = block * BLOCK_MEMBERS, min(members, (block + 1) * BLOCK_MEMBERS)
            b = _simulate_block(world, block, lo, hi, n_orders)
            if not part_writers or (part_rows > 0 and part_rows + b.transactions.num_rows > PART_MAX_ROWS):
                if part_writers:
                    part_writers[-1].close()
                part = tx_dir / f"part-{len(part_writers):05d}.parquet"
                part_writers.append(pq.ParquetWriter(part, tx_schema))
                part_rows = 0
            part_writers[-1].write_table(b.transactions)
            part_rows += b.transactions.num_rows
            w_members.write_table(b.members)
            w_campaigns.write_table(b.campaigns)
            if w_truth_members is None:
                w_truth_members = stack.enter_context(
                    pq.ParquetWriter(truth_dir / "members.parquet", b.truth_members.schema))
                w_truth_repl = stack.enter_context(
                    pq.ParquetWriter(truth_dir / "replenishment.parquet", b.truth_replenishment.schema))
            w_truth_members.write_table(b.truth_members)
            assert w_truth_repl is not None
            w_truth_repl.write_table(b.truth_replenishment)
            n_orders += b.n_orders
            n_lines += b.transactions.num_rows
            n_returns += b.n_returns
            n_campaign_rows += b.campaigns.num_rows
            pair_counts += b.pair_counts
            campaign_counts += b.campaign_counts
            msg = f"block {block + 1}/{n_blocks}: members {hi:,}, orders {n_orders:,}, lines {n_lines:,}"
            logger.debug(msg)
            if progress is not None:
                progress(msg)
        n_parts = len(part_writers)
        for w in part_writers:
            w.close()

        effects = _effects_table(world, campaign_counts)
        pq.write_table(effects, truth_dir / "campaign_effects.parquet")
        assoc = pa.table({
            T.ANTECEDENT: pa.array([world.cat_names[i] for i in world.pair_a], pa.string()),
            T.CONSEQUENT: pa.array([world.cat_names[i] for i in world.pair_b], pa.string()),
            T.PLANTED_PROB: pa.array(world.pair_q),
            T.BASKETS_ANTECEDENT: pa.array(pair_counts[:, 0]),
            T.BASKETS_BOTH: pa.array(pair_counts[:, 1]),
            T.OBSERVED_PROB: pa.array(pair_counts[:, 1] / np.maximum(pair_counts[:, 0], 1)),
        })
        pq.write_table(assoc, truth_dir / "associations.parquet")
        season = pa.table({
            T.DATE: _timestamps(world.start_us + np.arange(days, dtype=np.int64) * _US_PER_DAY),
            T.MULTIPLIER: pa.array(world.day_mult),
        })
        pq.write_table(season, truth_dir / "seasonality.parquet")
        end = str(world.start_day + np.timedelta64(days, "D"))
        summary_json = _truth_json(world, effects, assoc, members, n_orders, n_lines, n_returns,
                                   n_campaign_rows, end)
        (truth_dir / TRUTH_JSON).write_text(json.dumps(summary_json, indent=2, sort_keys=True) + "\n")

    paths.update({
        "transactions": out_dir / TRANSACTIONS_DIR,
        "members": out_dir / "members.parquet",
        "campaigns": out_dir / "campaigns.parquet",
        "truth": out_dir / TRUTH_DIR,
    })
    paths.update({f"transactions_part_{i}": out_dir / TRANSACTIONS_DIR / f"part-{i:05d}.parquet"
                  for i in range(n_parts)})
    logger.info("demo data written to %s: %d orders, %d lines", out_dir, n_orders, n_lines)
    return DemoSummary(
        out_dir=out_dir, seed=seed, members=members, orders=n_orders, lines=n_lines, return_lines=n_returns,
        items=int(world.item_cat.size), campaign_rows=n_campaign_rows, start=str(world.start_day), end=end,
        paths=paths,
    )


def _truth_json(world: _World, effects: pa.Table, assoc: pa.Table, members: int, n_orders: int,
                n_lines: int, n_returns: int, n_campaign_rows: int, end: str) -> dict:
    cats = world.cats
    return {
        "seed": world.seed,
        "members": members,
        "start": str(world.start_day),
        "end": end,
        "days": world.days,
        "counts": {"orders": n_orders, "lines": n_lines, "return_lines": n_returns,
                   "items": int(world.item_cat.size), "campaign_rows": n_campaign_rows},
        "categories": {c.name: {"replenishable": c.cycle_days > 0, "weight": c.weight,
                                "price_band": [c.price_lo, c.price_hi], "return_rate": c.return_rate}
                       for c in cats},
        "replenishment": {c.name: {"cycle_mean_days": c.cycle_days, "cycle_sd_days": c.cycle_sd,
                                   "replenisher_share_of_buyers": c.replenisher_share}
                          for c in cats if c.cycle_days > 0},
        "replenishment_jitter_sd_days": f"{_REPLENISH_JITTER[0]} + {_REPLENISH_JITTER[1]} * cycle",
        "replenishment_skip_prob": _REPLENISH_SKIP,
        "associations": [_json_row(r) for r in assoc.to_pylist()],
        "campaign_effects": [_json_row(r) for r in effects.to_pylist()],
        "campaign_holdout_share": HOLDOUT_SHARE,
        "campaign_windows_days": list(WINDOWS_DAYS),
        "campaign_answer": {"deal_seeker_factor": _CAMPAIGN_DEAL_SEEKER_FACTOR,
                            "delay_gamma_shape_scale_days": list(_CAMPAIGN_DELAY),
                            "max_delay_days": _CAMPAIGN_MAX_DELAY},
        "hazard": {
            "formula": "base * channel * (expected_rate / ref_rate) ** elasticity * exp(early_return * "
                       "early_returner + deal_seeker * deal_seeker) * frailty",
            "base_per_day": _BASE_HAZARD, "ref_rate_per_day": _HAZARD_REF_RATE,
            "elasticity": _HAZARD_FREQ_ELASTICITY, "early_return": _HAZARD_EARLY_RETURN,
            "deal_seeker": _HAZARD_DEAL_SEEKER, "frailty_lognormal_sd": _FRAILTY_SD,
            "channel": dict(zip(_CHANNELS, _CHANNEL_HAZARD.tolist(), strict=True)),
        },
        "channels": {ch: {"never_buy": float(nb), "rate_multiplier": float(rm), "join_purchase": float(jp)}
                     for ch, nb, rm, jp in zip(_CHANNELS, _CHANNEL_NEVER_BUY, _CHANNEL_RATE,
                                               _CHANNEL_JOIN_PURCHASE, strict=True)},
        "order_rate": {"gamma_shape": _RATE_SHAPE, "mean_per_day": _MEAN_ORDER_RATE},
        "join_trend": f"join density rises linearly to {1 + _JOIN_TREND:g}x its starting value",
        "deal_seeker_share": _DEAL_SEEKER_SHARE,
        "early_returner_share_of_buyers": _EARLY_RETURNER_SHARE,
        "returns": "same order_id as the purchase, own ts 1-21 days later, negative quantity and amount, "
                   "discount 0",
        "seasonality": "day multiplier of the purchase rate (per day in seasonality.parquet): weekday "
                       f"Mon..Sun {_WEEKDAY.tolist()}, December x1.3, January x0.85, Feb 13-14 x1.6, "
                       "Mother's Day weekend x1.5, Black Friday x2.5 and the Sat-Mon after x1.6, Dec 18-23 "
                       "x1.5, Dec 25 x0.2, Dec 26 x1.4",
        "time_of_day_weights_by_hour_utc": _HOURLY.tolist(),
        "purchase_within_window": "a purchase line with sent_at < ts <= sent_at + W days",
        "never_buyers": "dropout_at = joined_at, never_buys true",
    }


def _json_row(row: dict) -> dict:
    """A truth row as JSON values: timestamps as ISO text, NaN as null."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif hasattr(v, "isoformat"):
            v = v.isoformat()
        out[k] = v
    return out
