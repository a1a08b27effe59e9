"""The data contract: every table's columns, their types and meaning, in one place.

Code refers to columns through these constants (``C.MEMBER_ID``), never through string literals, so a
rename happens here and nowhere else. Types are the normalised types of the lake (after ingest):

- ``string``: UTF-8 text (identifiers are always text, whatever the source used)
- ``timestamp``: timezone-aware UTC, microsecond precision
- ``float``/``int``/``bool``: as named

Example::

    from features.contract import C, TRANSACTIONS
    TRANSACTIONS.required          # ('member_id', 'order_id', 'ts', 'item_id', 'quantity', 'amount')
    TRANSACTIONS.dtype(C.AMOUNT)   # 'float'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["string", "timestamp", "float", "int", "bool"]


class C:
    """Column names of the lake, the feature tables and the Feast entities."""

    # identifiers and entity join keys
    MEMBER_ID = "member_id"
    ITEM_ID = "item_id"
    ORDER_ID = "order_id"
    CATEGORY = "category"
    CAMPAIGN_ID = "campaign_id"

    # transactions
    TS = "ts"
    QUANTITY = "quantity"
    AMOUNT = "amount"
    DISCOUNT = "discount"
    IS_RETURN = "is_return"

    # members
    JOINED_AT = "joined_at"
    CHANNEL = "channel"
    BIRTH_YEAR = "birth_year"
    GENDER = "gender"
    REGION = "region"

    # items
    ITEM_NAME = "item_name"
    PRICE = "price"
    REPLENISHABLE = "replenishable"

    # campaigns
    ARM = "arm"
    SENT_AT = "sent_at"
    COUPON = "coupon"
    COUPON_VALUE = "coupon_value"

    # feature tables
    AS_OF = "as_of"  # feature timestamp: values use only data strictly before it
    CREATED_AT = "created_at"
    EVENT_TIMESTAMP = "event_timestamp"  # entity rows of a training set: features as of this instant
    FEATURE_TS = "feature_ts"  # online read: as_of of the values returned (null when not found)
    FEATURE_AGE_DAYS = "feature_age_days"  # online read: days between feature_ts and the read
    STALE = "stale"  # online read: older than features.ttl_days, or not found

    # rejects
    SOURCE_FILE = "source_file"
    SOURCE_ROW = "source_row"
    REASON = "reason"


ARM_TREATMENT = "treatment"
ARM_HOLDOUT = "holdout"
ARMS = (ARM_TREATMENT, ARM_HOLDOUT)


@dataclass(frozen=True)
class Column:
    name: str
    dtype: DType
    required: bool
    description: str


@dataclass(frozen=True)
class Table:
    """One table of the contract: its columns and its primary key."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    description: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def dtype(self, name: str) -> DType:
        for c in self.columns:
            if c.name == name:
                return c.dtype
        raise KeyError(f"table {self.name!r} has no column {name!r}; it has {', '.join(self.names)}")

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name!r} has no column {name!r}; it has {', '.join(self.names)}")


TRANSACTIONS = Table(
    name="transactions",
    description="One line of an order (basket). Returns and cancellations are lines with is_return true "
    "and negative quantity and amount.",
    key=(C.ORDER_ID, C.ITEM_ID, C.IS_RETURN),
    columns=(
        Column(C.MEMBER_ID, "string", True, "member who placed the order"),
        Column(C.ORDER_ID, "string", True, "order (basket) identifier; one order is one basket"),
        Column(C.TS, "timestamp", True, "when the order was placed, UTC"),
        Column(C.ITEM_ID, "string", True, "item bought"),
        Column(C.CATEGORY, "string", False, "item category; filled from the items table when absent"),
        Column(C.QUANTITY, "float", True, "units; negative on a return line"),
        Column(C.AMOUNT, "float", True, "amount paid for the line after discount; negative on a return"),
        Column(C.DISCOUNT, "float", False, "discount granted on the line (>= 0); 0 when absent"),
        Column(C.IS_RETURN, "bool", False, "true for a return or cancellation line"),
    ),
)

MEMBERS = Table(
    name="members",
    description="One row per member of the programme.",
    key=(C.MEMBER_ID,),
    columns=(
        Column(C.MEMBER_ID, "string", True, "member identifier"),
        Column(C.JOINED_AT, "timestamp", True, "when the member joined, UTC"),
        Column(C.CHANNEL, "string", False, "acquisition channel (store, web, app, referral, ...)"),
        Column(C.BIRTH_YEAR, "int", False, "optional attribute"),
        Column(C.GENDER, "string", False, "optional attribute"),
        Column(C.REGION, "string", False, "optional attribute"),
    ),
)

ITEMS = Table(
    name="items",
    description="One row per item of the catalogue.",
    key=(C.ITEM_ID,),
    columns=(
        Column(C.ITEM_ID, "string", True, "item identifier"),
        Column(C.CATEGORY, "string", True, "category the item belongs to"),
        Column(C.PRICE, "float", False, "list price (>= 0)"),
        Column(C.REPLENISHABLE, "bool", False, "bought again on a cycle (formula, detergent, ...)"),
        Column(C.ITEM_NAME, "string", False, "human-readable name"),
    ),
)

CAMPAIGNS = Table(
    name="campaigns",
    description="One row per member targeted by a campaign, in the treatment or the holdout arm.",
    key=(C.CAMPAIGN_ID, C.MEMBER_ID),
    columns=(
        Column(C.CAMPAIGN_ID, "string", True, "campaign identifier"),
        Column(C.MEMBER_ID, "string", True, "member in the campaign"),
        Column(C.ARM, "string", True, "'treatment' or 'holdout'"),
        Column(C.SENT_AT, "timestamp", True, "when the message was sent (or would have been), UTC"),
        Column(C.COUPON, "string", False, "coupon code or type offered to the treatment arm"),
        Column(C.COUPON_VALUE, "float", False, "coupon face value"),
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (TRANSACTIONS, MEMBERS, ITEMS, CAMPAIGNS)}

# Columns written to every rejects file beside the offending row's original values.
REJECT_COLUMNS = (C.SOURCE_FILE, C.SOURCE_ROW, C.REASON)


def table(name: str) -> Table:
    """The contract table called ``name``, with a clear error for an unknown one."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; the contract has {', '.join(TABLES)}") from None


# --- feature tables -------------------------------------------------------------------------------------
# Snapshots written by features.compute and read by Feast. Every value in a row with as_of = D uses only
# transactions with ts < D (the point-in-time rule). Windowed columns exist for every window in settings
# (features.windows_days); the names below are for the default windows 30/90/180/365.


class F:
    """Member feature names (entity: member)."""

    TENURE_DAYS = "tenure_days"
    RECENCY_DAYS = "recency_days"  # days since the last purchase; null when none yet
    FIRST_PURCHASE_DAYS = "days_since_first_purchase"
    ORDERS_TOTAL = "orders_total"
    SPEND_TOTAL = "spend_total"
    AVG_ORDER_VALUE = "avg_order_value"
    GAP_MEAN_DAYS = "gap_mean_days"  # mean days between consecutive orders (null with < 2 orders)
    GAP_STD_DAYS = "gap_std_days"
    RECENCY_GAP_RATIO = "recency_gap_ratio"  # recency / own usual gap
    SPEND_PREV_90D = "spend_prev_90d"  # spend in the 90 days before the last 90
    SPEND_TREND_90D = "spend_trend_90d"  # spend_90d / spend_prev_90d - 1; null when prev is 0
    BASKET_SIZE_MEAN = "basket_size_mean"  # mean distinct items per order
    N_CATEGORIES = "n_categories"
    TOP_CATEGORY = "top_category"
    TOP_CATEGORY_SHARE = "top_category_share"
    CATEGORY_ENTROPY = "category_entropy"
    DISCOUNT_SHARE = "discount_share"  # discount / (amount + discount) over purchases
    RETURN_SHARE = "return_share"  # returned amount / purchased amount
    REPLENISHABLE_SHARE = "replenishable_share"
    RFM_R = "rfm_r"
    RFM_F = "rfm_f"
    RFM_M = "rfm_m"
    RFM_SEGMENT = "rfm_segment"
    LIFECYCLE_STAGE = "lifecycle_stage"
    CHANNEL = C.CHANNEL

    @staticmethod
    def orders(window_days: int) -> str:
        return f"orders_{window_days}d"

    @staticmethod
    def spend(window_days: int) -> str:
        return f"spend_{window_days}d"


class FC:
    """Member x category feature names (entities: member, category), one row per category bought."""

    CAT_ORDERS = "cat_orders"
    CAT_SPEND_SHARE = "cat_spend_share"
    CAT_RECENCY_DAYS = "cat_recency_days"
    CAT_GAP_MEAN_DAYS = "cat_gap_mean_days"
    CAT_GAP_STD_DAYS = "cat_gap_std_days"
    CAT_DUE_RATIO = "cat_due_ratio"  # cat_recency_days / cat_gap_mean_days
    CAT_REPLENISHABLE = "cat_replenishable"


class FI:
    """Item feature names (entity: item)."""

    ITEM_BUYERS_30D = "item_buyers_30d"
    ITEM_ORDERS_90D = "item_orders_90d"
    ITEM_REPEAT_RATE = "item_repeat_rate"  # share of the item's buyers who bought it more than once
    ITEM_PRICE = "item_price"
    ITEM_CATEGORY = "item_category"
    ITEM_REPLENISHABLE = "item_replenishable"


def member_feature_schema(windows_days: tuple[int, ...] = (30, 90, 180, 365)) -> dict[str, DType]:
    """Column -> type of a member feature snapshot, in order, after the keys (member_id, as_of).

    Integers never hold nulls (counts are 0 when there is nothing to count; RFM scores are 0 for a member
    without a purchase); floats use NaN for 'not defined' (recency of a member who never bought).
    """
    schema: dict[str, DType] = {F.TENURE_DAYS: "int", F.RECENCY_DAYS: "float", F.FIRST_PURCHASE_DAYS: "float",
                                F.ORDERS_TOTAL: "int", F.SPEND_TOTAL: "float"}
    for w in windows_days:
        schema[F.orders(w)] = "int"
    for w in windows_days:
        schema[F.spend(w)] = "float"
    schema.update({
        F.AVG_ORDER_VALUE: "float", F.GAP_MEAN_DAYS: "float", F.GAP_STD_DAYS: "float",
        F.RECENCY_GAP_RATIO: "float", F.SPEND_PREV_90D: "float", F.SPEND_TREND_90D: "float",
        F.BASKET_SIZE_MEAN: "float", F.N_CATEGORIES: "int", F.TOP_CATEGORY: "string",
        F.TOP_CATEGORY_SHARE: "float", F.CATEGORY_ENTROPY: "float", F.DISCOUNT_SHARE: "float",
        F.RETURN_SHARE: "float", F.REPLENISHABLE_SHARE: "float", F.RFM_R: "int", F.RFM_F: "int",
        F.RFM_M: "int", F.RFM_SEGMENT: "string", F.LIFECYCLE_STAGE: "string", F.CHANNEL: "string",
    })
    return schema


MEMBER_CATEGORY_FEATURE_SCHEMA: dict[str, DType] = {
    FC.CAT_ORDERS: "int", FC.CAT_SPEND_SHARE: "float", FC.CAT_RECENCY_DAYS: "float",
    FC.CAT_GAP_MEAN_DAYS: "float", FC.CAT_GAP_STD_DAYS: "float", FC.CAT_DUE_RATIO: "float",
    FC.CAT_REPLENISHABLE: "bool",
}
"""Member x category snapshot columns after the keys (member_id, category, as_of)."""

ITEM_FEATURE_SCHEMA: dict[str, DType] = {
    FI.ITEM_BUYERS_30D: "int", FI.ITEM_ORDERS_90D: "int", FI.ITEM_REPEAT_RATE: "float",
    FI.ITEM_PRICE: "float", FI.ITEM_CATEGORY: "string", FI.ITEM_REPLENISHABLE: "bool",
}
"""Item snapshot columns after the keys (item_id, as_of)."""
