"""Settings: one YAML file validated by pydantic, with environment-variable overrides and profiles.

Where the values come from, later ones winning:

1. ``features/settings.yaml`` shipped with the package (the documented defaults);
2. the file named by ``REPURCHASE_SETTINGS`` (or passed as ``--settings``), merged key by key;
3. environment variables ``REPURCHASE__SECTION__KEY=value`` (double underscores between levels; values
   are parsed as YAML, so ``REPURCHASE__LIFECYCLE__DORMANT_DAYS=60`` gives an int);
4. ``REPURCHASE_PROFILE`` (``embedded`` or ``production``) and ``REPURCHASE_HOME`` as short-hands.

Unknown keys are rejected with the offending path named. Lifecycle and segment rules live here and only
here: labels, segments, lists, dashboards and the API all read them from this model.

Example::

    from features.settings import load_settings
    s = load_settings()
    s.lifecycle.dormant_days        # 90
    s.paths.lake                    # <home>/lake
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULTS_FILE = Path(__file__).with_name("settings.yaml")
ENV_PREFIX = "REPURCHASE__"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """Settings that cannot be loaded; the message names the file and the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lifecycle(_Model):
    """Lifecycle stages: new / active / dormant / churned / reactivated."""

    new_member_days: int = Field(30, gt=0, description="A member who joined this many days ago or fewer is 'new'.")
    dormant_days: int = Field(90, gt=0, description="No purchase in this many days: 'dormant'.")
    churned_days: int = Field(180, gt=0, description="No purchase in this many days: 'churned'.")
    churn_horizon_days: int | None = Field(
        None, gt=0, description="Churn label: no purchase in the next H days. Null means dormant_days."
    )
    reactivated_days: int = Field(
        30, gt=0, description="A member whose latest purchase ended a gap of at least dormant_days and "
        "happened within this many days is 'reactivated'."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Lifecycle:
        if not self.dormant_days < self.churned_days:
            raise ValueError(
                f"lifecycle.dormant_days ({self.dormant_days}) must be below churned_days ({self.churned_days})"
            )
        return self

    @property
    def horizon_days(self) -> int:
        return self.churn_horizon_days or self.dormant_days


class RfmSegment(_Model):
    """One named RFM segment: a member whose scores fall in every range belongs to it (first match wins)."""

    name: str = Field(description="Segment name shown to marketers.")
    r: tuple[int, int] = Field((1, 5), description="Inclusive range of the recency score (5 = most recent).")
    f: tuple[int, int] = Field((1, 5), description="Inclusive range of the frequency score.")
    m: tuple[int, int] = Field((1, 5), description="Inclusive range of the monetary score.")


class Rfm(_Model):
    """The RFM scheme: quantile scores 1..bins among members with a purchase, then named segments."""

    bins: int = Field(5, ge=2, le=10, description="Number of quantile scores per dimension.")
    window_days: int = Field(365, gt=0, description="Frequency and monetary are counted over this window.")
    new_segment: str = Field("New", description="Segment of members who joined within new_member_days.")
    no_purchase_segment: str = Field("Prospect", description="Segment of older members who never bought.")
    segments: tuple[RfmSegment, ...] = Field(description="Named segments, first match wins; the last "
                                             "should catch everything.")

    @model_validator(mode="after")
    def _ranges(self) -> Rfm:
        for seg in self.segments:
            for dim in ("r", "f", "m"):
                lo, hi = getattr(seg, dim)
                if not 1 <= lo <= hi <= self.bins:
                    raise ValueError(f"rfm.segments[{seg.name}].{dim} = {[lo, hi]} is not within 1..{self.bins}")
        return self

    @property
    def segment_names(self) -> tuple[str, ...]:
        return (*dict.fromkeys(s.name for s in self.segments), self.new_segment, self.no_purchase_segment)


class FeatureSettings(_Model):
    """Member feature computation."""

    windows_days: tuple[int, ...] = Field((30, 90, 180, 365), description="Windows for orders_Nd and spend_Nd.")
    snapshot_every_days: int = Field(7, gt=0, description="Spacing of historical snapshots for training.")
    history_days: int = Field(730, gt=0, description="How far back historical snapshots go from the last date.")
    ttl_days: int = Field(
        2, gt=0, description="Online values older than this are flagged stale (Feast's ttl on the views)."
    )
    engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="What computes the snapshots and batch scores: DuckDB in this process, or Spark "
        "(settings.spark) from the same definitions.")


class SparkSettings(_Model):
    """The Spark session of ``engine: spark`` (features.spark, pipelines.score)."""

    master: str = Field("local[2]", description="local[N] on one machine, or a cluster: spark://host:7077, yarn.")
    app_name: str = Field("repurchase", description="Spark application name.")
    shuffle_partitions: int = Field(8, ge=1, description="spark.sql.shuffle.partitions.")
    score_partitions: int = Field(0, ge=0, description="Partitions the members are scored in (pandas UDFs); 0: "
                                  "one per 200,000 members, at least the default parallelism.")
    conf: dict[str, str] = Field(default_factory=dict, description="Any other Spark configuration.")


class Paths(_Model):
    """Where data lives. Relative paths are resolved against `home`."""

    home: Path = Field(Path("var"), description="Root of all data; relative to the project root.")
    raw: Path = Field(Path("raw"), description="Incoming files (and the demo generator's output).")
    lake: Path = Field(Path("lake"), description="Partitioned parquet written by ingest.")
    rejects: Path = Field(Path("rejects"), description="Quarantined rows with reasons, one file per run.")
    features: Path = Field(Path("features"), description="Feature snapshots (Feast offline sources).")
    feast: Path = Field(Path("feast"), description="Feast repo config, registry and SQLite online store.")
    outputs: Path = Field(Path("outputs"), description="Scores, lists and dashboards.")

    def resolve(self, root: Path = PROJECT_ROOT) -> Paths:
        home = self.home if self.home.is_absolute() else root / self.home
        def under(p: Path) -> Path:
            return p if p.is_absolute() else home / p
        return Paths(home=home, raw=under(self.raw), lake=under(self.lake), rejects=under(self.rejects),
                     features=under(self.features), feast=under(self.feast), outputs=under(self.outputs))


class FeastSettings(_Model):
    """The Feast feature store, per profile."""

    project: str = Field("repurchase", pattern=r"^[a-z][a-z0-9_]*$", description="Feast project name.")
    redis_connection: str = Field("127.0.0.1:6379", description="Production online store (Redis) address.")
    registry_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        description="Production SQL registry (SQLAlchemy URL).",
    )


class MlflowSettings(_Model):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(
        None, description="Tracking URI. Null: sqlite:///<project>/mlruns/mlflow.db (embedded) or "
        "production_tracking_uri (production)."
    )
    production_tracking_uri: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/test", description="Tracking store in production."
    )
    artifact_root: Path = Field(Path("mlruns/artifacts"), description="Artifact root, relative to the project.")
    experiment: str = Field("repurchase", description="Experiment that runs are logged to.")


class DemoSettings(_Model):
    """The synthetic demo data."""

    members: int = Field(20_000, gt=0, description="Members generated by `repurchase demo` by default.")
    seed: int = Field(7, description="Random seed; the same seed gives the same data.")
    start: str = Field("2023-01-01", description="First day of the generated history.")
    days: int = Field(1095, gt=60, description="Length of the generated history in days (three years: the "
                      "value model needs a 12-month label before a 12-month backtest).")


class IngestSettings(_Model):
    """Ingest of raw files."""

    default_timezone: str = Field("UTC", description="Time zone of naive timestamps in raw files.")
    max_reject_share: float = Field(
        0.5, ge=0, le=1, description="Fail the ingest (writing nothing) when more rows than this share are bad."
    )


class TuningSettings(_Model):
    """optuna hyper-parameter search on time-based folds, bounded by trials and time."""

    trials: int = Field(20, ge=0, description="Trials per model; 0 trains with the default parameters.")
    timeout_s: float = Field(600.0, gt=0, description="Stop starting new trials after this many seconds.")
    seed: int = Field(7, description="Sampler seed: the same data and seed give the same trials.")
    max_rows: int = Field(100_000, gt=0, description="Entity rows each tuning fit reads, sampled by member "
                          "(the final fit reads up to training.max_train_rows).")


class TrainingSettings(_Model):
    """Training cutoffs, model outputs and their bounds (churn, next purchase, value)."""

    cutoffs: int = Field(4, ge=2, description="Training cutoffs before the backtest cutoff; the latest of "
                         "them is the validation fold (early stopping, calibration).")
    cutoff_every_days: int = Field(28, gt=0, description="Spacing of the training cutoffs.")
    value_horizon_days: int = Field(365, gt=0, description="Window of the value label (spend in the next N days).")
    max_train_rows: int = Field(500_000, gt=0, description="Most entity rows (member x cutoff) one fit "
                                "reads; more are sampled deterministically by member.")
    max_backtest_rows: int = Field(250_000, gt=0, description="Most entity rows a backtest judges the "
                                   "models and baselines on; more are sampled deterministically by member (the "
                                   "same members for every version, so the promotion gate compares like with "
                                   "like).")
    max_trees: int = Field(300, gt=0, description="Most boosting rounds (early stopping usually ends sooner); "
                           "scoring time grows with the trees.")
    churn_bands: dict[str, float] = Field(
        {"low": 0.0, "medium": 0.3, "high": 0.6},
        description="Churn band name -> lowest calibrated probability in it, in increasing order.")
    interval: float = Field(0.8, gt=0, lt=1, description="Coverage of the next-purchase interval.")
    next_purchase_bins_days: tuple[int, ...] = Field(
        (7, 14, 21, 30, 45, 60, 90, 120, 180, 270, 365),
        description="Right edges (days after the cutoff) of the discrete-time hazard's periods.")
    next_purchase_period_trees: int = Field(
        60, ge=0, description="Next purchase: trees on the person-period rows (they see the period columns and "
        "run once per period); the rest of max_trees see member columns only and run once per member. 0: "
        "every tree on the person-period rows (11x the scoring cost).")
    remind_quantile: float = Field(0.25, gt=0, lt=1, description="Remind when P(bought again) reaches this.")
    remind_lead_days: int = Field(3, ge=0, description="Remind at least this many days before the usual "
                                  "cycle (mean gap) ends.")
    num_threads: int = Field(1, ge=0, description="LightGBM threads for training (0: all cores). One by "
                             "default: on a shared 2-core machine more threads made training 20x slower.")
    tuning: TuningSettings = Field(default_factory=TuningSettings, description="Hyper-parameter search.")

    @model_validator(mode="after")
    def _check(self) -> TrainingSettings:
        bins = list(self.next_purchase_bins_days)
        if not bins or bins != sorted(set(bins)) or bins[0] <= 0:
            raise ValueError(f"next_purchase_bins_days must be positive and strictly increasing, got {bins}")
        lows = list(self.churn_bands.values())
        if not lows or lows != sorted(lows) or lows[0] != 0.0:
            raise ValueError(f"churn_bands must start at 0.0 and increase, got {self.churn_bands}")
        return self


class BasketSettings(_Model):
    """Association rules over baskets (one order is one basket) and similar items."""

    by: Literal["item", "category"] = Field("item", description="What a rule relates: items or categories.")
    min_count: int = Field(5, ge=1, description="Fewest baskets holding both sides of a rule (and each side).")
    min_support: float = Field(0.0, ge=0, le=1, description="Smallest share of baskets holding both sides.")
    min_confidence: float = Field(0.05, ge=0, le=1, description="Smallest P(consequent | antecedent).")
    min_lift: float = Field(1.0, ge=0, description="Smallest lift kept (1: at least independence).")
    top: int = Field(20, gt=0, description="Rules listed, and answers given, by default.")
    similar_factors: int = Field(32, gt=0, description="ALS factors of the item-to-item model on baskets.")
    similar_iterations: int = Field(10, gt=0, description="ALS iterations of the item-to-item model.")


class RecommendSettings(_Model):
    """The implicit ALS recommender and its repurchase-aware ranking."""

    factors: int = Field(64, gt=0, description="ALS latent factors.")
    regularization: float = Field(0.05, ge=0, description="ALS L2 regularisation.")
    alpha: float = Field(2.0, gt=0, description="Confidence scale: c = 1 + alpha * weight.")
    iterations: int = Field(15, gt=0, description="ALS sweeps.")
    weighting: Literal["bm25", "log"] = Field("bm25", description="Member x item weight of the decayed "
                                              "purchase counts: BM25 or log(1 + count).")
    half_life_days: float = Field(720.0, gt=0, description="Recency decay of a purchase's weight.")
    blend: float = Field(0.95, ge=0, le=1, description="Weight of the member's own history against ALS for "
                         "items they bought (0: ALS only, 1: own history only).")
    due_from: float = Field(0.0, ge=0, description="A bought replenishable item comes back once the days "
                            "since its last purchase reach this share of the member's cycle for it.")
    repeat_share: float = Field(0.0, ge=0, le=1, description="A bought item comes back when due if the items "
                                "table marks it replenishable or at least this share of its buyers bought it on "
                                "two days or more (one at least when the table marks it durable).")
    lookahead_days: int = Field(28, ge=0, description="A bought item is due when its cycle ends within this "
                                "many days (the span a campaign's recommendations are for).")
    due_power: float = Field(0.5, ge=0, description="Own-history score times min(1, (days since + lookahead) / "
                             "cycle) to this power: items due sooner rank higher (0: timing ignored).")
    n: int = Field(10, gt=0, description="Recommendations per member by default.")
    max_per_category: int = Field(0, ge=0, description="Most recommendations from one category (0: no cap).")
    exclude_categories: tuple[str, ...] = Field((), description="Categories never recommended.")
    out_of_stock_file: Path | None = Field(None, description="File of item ids (one a line) not to recommend.")
    cold_start_by: str = Field("region", description="Member attribute whose groups get their own popular "
                               "and trending items for members with no history.")
    popular_days: int = Field(28, gt=0, description="Window of the popular and trending lists.")
    horizon_days: int = Field(28, gt=0, description="Test window of the time split (items bought after the "
                              "cutoff).")
    seed: int = Field(7, description="ALS random state.")
    num_threads: int = Field(1, ge=0, description="ALS and top-N threads (0: all cores).")
    trials: int = Field(12, ge=0, description="optuna trials on the time split; 0 keeps these settings.")
    timeout_s: float = Field(600.0, gt=0, description="Stop starting new trials after this many seconds.")


class ServingSettings(_Model):
    """The HTTP API (``repurchase serve``)."""

    host: str = Field("127.0.0.1", description="Address `repurchase serve` binds (0.0.0.0 behind a balancer).")
    port: int = Field(3000, gt=0, lt=65536, description="Port of the API.")
    workers: int = Field(1, ge=1, description="Worker processes; each loads the models and reads Feast itself.")
    api_keys: tuple[str, ...] = Field(
        (), description="Keys a caller sends as `Authorization: Bearer <key>` or `X-API-Key`. REPURCHASE_API_KEYS "
        "(comma-separated) adds keys from the environment. With none, every guarded path answers 401.")
    open_docs: bool = Field(False, description="Serve the OpenAPI page (/) and schema (/docs.json) without a key.")
    alias: str = Field("champion", description="Registry alias of the models the API serves.")
    reload_interval_s: float = Field(30.0, gt=0, description="How often each worker checks the alias for a "
                                     "new version (then loads it beside the old one and swaps).")
    timeout_s: float = Field(10.0, gt=0, description="Requests running longer are answered 504 (BentoML "
                             "keeps every request's timer alive this long: short keeps memory flat).")
    max_batch: int = Field(1000, ge=1, le=10_000, description="Most members (or items) in one batch call.")
    max_page_size: int = Field(1000, ge=1, description="Most members in one page of a segment or stage.")
    reasons: int = Field(3, ge=0, le=10, description="Churn reasons in a profile.")
    reasons_bands: tuple[str, ...] = Field(
        ("medium", "high"), description="Churn bands whose members get reasons (profiles, scores, lists); "
        "the others get none. SHAP reasons cost ~100x the probability: explaining only members at risk keeps "
        "`repurchase score` of a million members within minutes.")
    reasons_skip_stages: tuple[str, ...] = Field(
        ("churned",), description="Lifecycle stages whose members get no reasons (a churned member has "
        "lapsed already; half the demo's members are churned).")
    precomputed_recommendations: int = Field(
        20, ge=0, le=100, description="Recommendations per member `repurchase score` keeps for the API; a "
        "profile asking for more runs the recommender live.")
    score_threads: int = Field(0, ge=0, description="Threads `repurchase score` scores chunks of members on "
                               "(0: every core; the daily run has the machine).")
    use_scores: bool = Field(True, description="Answer profiles from `repurchase score`'s partition when it "
                             "was made by the served versions from the latest snapshot (else live).")


class ListSettings(_Model):
    """Marketer lists (`repurchase lists export`) and campaign analysis (`repurchase campaigns report`)."""

    holdout_share: float = Field(0.1, ge=0.0, lt=1.0, description="Share of a list held out as its control.")
    seed: int = Field(7, description="Seed of the holdout draw (with the list name and the member id).")
    high_value_quantile: float = Field(0.9, gt=0.0, lt=1.0, description="Expected spend at or above this "
                                       "quantile of all scored members is high value: perks, not discounts.")
    vip_segments: tuple[str, ...] = Field(("Champions",), description="RFM segments treated as high value.")
    due_ratio: float = Field(0.8, gt=0.0, description="A category is due when the member's days since they "
                             "last bought it reach this share of their usual gap in it.")
    windows_days: tuple[int, ...] = Field((7, 14, 30), description="Repurchase windows of a campaign report.")
    redemption_tolerance: float = Field(0.05, ge=0.0, description="An order whose discount is within this of "
                                        "the coupon's face value redeemed it.")


class DailyList(_Model):
    """One list the daily run exports (the options of `repurchase lists export`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$", description="List name; the date is appended.")
    stages: tuple[str, ...] = ()
    segments: tuple[str, ...] = ()
    bands: tuple[str, ...] = ()
    min_value: float | None = None
    category_due: str | None = None
    top: int | None = Field(None, ge=1)


class DailySettings(_Model):
    """`repurchase run-daily`."""

    send_hour: int = Field(9, ge=0, le=23, description="The daily lists go out at this hour (UTC) the next day.")
    lists: tuple[DailyList, ...] = Field(
        (DailyList(name="at-risk", bands=("high",), top=1000), DailyList(name="win-back", stages=("dormant",)),
         DailyList(name="welcome", stages=("new",))), description="Lists exported every day.")


class Settings(_Model):
    """All settings of repurchase."""

    profile: Literal["embedded", "production"] = Field(
        "embedded", description="embedded: local files, SQLite, local MLflow; production: Redis, PostgreSQL."
    )
    paths: Paths = Field(default_factory=Paths, description="Data locations.")
    lifecycle: Lifecycle = Field(default_factory=Lifecycle, description="Lifecycle rules.")
    rfm: Rfm = Field(description="RFM scores and segments.")
    features: FeatureSettings = Field(default_factory=FeatureSettings, description="Feature computation.")
    spark: SparkSettings = Field(default_factory=SparkSettings, description="Spark, for engine: spark.")
    feast: FeastSettings = Field(default_factory=FeastSettings, description="Feature store.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="Model tracking.")
    demo: DemoSettings = Field(default_factory=DemoSettings, description="Demo data.")
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Ingest.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Model training.")
    basket: BasketSettings = Field(default_factory=BasketSettings, description="Basket associations.")
    recommend: RecommendSettings = Field(default_factory=RecommendSettings, description="Recommendations.")
    serving: ServingSettings = Field(default_factory=ServingSettings, description="The HTTP API.")
    lists: ListSettings = Field(default_factory=ListSettings, description="Lists, holdouts, campaign reports.")
    daily: DailySettings = Field(default_factory=DailySettings, description="The daily run.")

    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    @model_validator(mode="after")
    def _check_bands(self) -> Settings:
        unknown = [b for b in self.serving.reasons_bands if b not in self.training.churn_bands]
        if unknown:
            raise ValueError(f"serving.reasons_bands names {', '.join(map(repr, unknown))}, not a band of "
                             f"training.churn_bands ({', '.join(self.training.churn_bands)})")
        return self

    @cached_property
    def dirs(self) -> Paths:
        """``paths`` resolved to absolute paths."""
        return self.paths.resolve()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if self.profile == "production":
            return self.mlflow.production_tracking_uri
        return f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path, what: str = "settings file", error: type[ValueError] = SettingsError) -> dict[str, Any]:
    """A YAML file holding a mapping at the top, or ``error`` naming ``what`` and the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    if "REPURCHASE_PROFILE" in environ:
        out["profile"] = environ["REPURCHASE_PROFILE"]
    if "REPURCHASE_HOME" in environ:
        out.setdefault("paths", {})["home"] = environ["REPURCHASE_HOME"]
    return out


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Load the settings: defaults, then ``path`` (or $REPURCHASE_SETTINGS), then the environment,
    then keyword ``overrides`` (nested dicts, e.g. ``paths={"home": tmp}``)."""
    environ = dict(os.environ if environ is None else environ)
    data = read_yaml(DEFAULTS_FILE)
    sources = [str(DEFAULTS_FILE)]
    path = path or environ.get("REPURCHASE_SETTINGS")
    if path:
        data = _deep_merge(data, read_yaml(Path(path)))
        sources.append(str(path))
    data = _deep_merge(data, _env_overrides(environ))
    data = _deep_merge(data, overrides)
    env_keys = [k.strip() for k in environ.get("REPURCHASE_API_KEYS", "").split(",") if k.strip()]
    if env_keys:
        serving = dict(data.get("serving") or {})
        serving["api_keys"] = [*(serving.get("api_keys") or []), *env_keys]
        data["serving"] = serving
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise SettingsError(f"invalid settings (from {', '.join(sources)} and REPURCHASE__* variables):\n"
                            + "\n".join(lines)) from None
