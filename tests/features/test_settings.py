from pathlib import Path

import pytest

from features.settings import SettingsError, load_settings


def test_defaults_hold_the_lifecycle_rules():
    s = load_settings(environ={})
    assert (s.lifecycle.new_member_days, s.lifecycle.dormant_days, s.lifecycle.churned_days) == (30, 90, 180)
    assert s.lifecycle.horizon_days == 90  # null horizon means the dormant days
    assert s.profile == "embedded"
    assert s.rfm.segment_names[:3] == ("Champions", "Loyal", "Potential")
    assert s.tracking_uri.startswith("sqlite:///") and s.tracking_uri.endswith("mlruns/mlflow.db")


def test_file_and_environment_override_in_order(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("lifecycle:\n  dormant_days: 60\n  churn_horizon_days: 45\n")
    s = load_settings(f, environ={"REPURCHASE__LIFECYCLE__DORMANT_DAYS": "75", "REPURCHASE_HOME": str(tmp_path)})
    assert s.lifecycle.dormant_days == 75  # environment wins over the file
    assert s.lifecycle.horizon_days == 45
    assert s.lifecycle.churned_days == 180  # untouched keys keep their defaults
    assert s.dirs.lake == tmp_path / "lake"


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("lifecycle:\n  dormant_dayz: 60\n")
    with pytest.raises(SettingsError, match=r"lifecycle\.dormant_dayz: Extra inputs are not permitted"):
        load_settings(f, environ={})


def test_unknown_environment_key_is_rejected():
    with pytest.raises(SettingsError, match=r"features\.window: Extra inputs"):
        load_settings(environ={"REPURCHASE__FEATURES__WINDOW": "3"})


def test_inconsistent_lifecycle_is_rejected():
    with pytest.raises(SettingsError, match=r"dormant_days \(200\) must be below churned_days \(180\)"):
        load_settings(environ={"REPURCHASE__LIFECYCLE__DORMANT_DAYS": "200"})


def test_rfm_segment_range_outside_bins_is_rejected(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("rfm:\n  segments:\n    - {name: Top, r: [4, 6]}\n")
    with pytest.raises(SettingsError, match=r"rfm.segments\[Top\].r = \[4, 6\] is not within 1..5"):
        load_settings(f, environ={})


def test_missing_and_malformed_files_name_the_file(tmp_path: Path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SettingsError, match=rf"{bad}.*must hold a mapping"):
        load_settings(bad, environ={})


def test_production_profile_switches_the_tracking_store():
    s = load_settings(environ={"REPURCHASE_PROFILE": "production"})
    assert s.profile == "production"
    assert s.tracking_uri.startswith("postgresql")


def test_every_setting_is_documented():
    from features.settings import Settings

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(Settings)
